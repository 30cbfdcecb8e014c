"""``python -m rnnserve.bench.engine_cpu``: the engine's own CPU per step against onnxruntime.

Speed is never asserted (the figures are for reading side by side); the tests prove the tool
runs the real engine on the real model and reports figures that add up.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

FIELDS = ("engine_us_per_step", "ort_us_per_step", "engine_own_us_per_step", "engine_over_ort")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rnnserve.bench.engine_cpu", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_python_only_with_eviction_reports_figures_that_add_up(tmp_path: Path) -> None:
    out = tmp_path / "engine.json"
    args = ("--batches", "1", "8", "--repeats", "1", "--seconds", "0.1", "--json", str(out))
    done = _run(*args, "--python-only", "--evict-mb", "1")
    assert done.returncode == 0, done.stderr
    assert "1 MiB read in place of each run" in done.stdout
    figures = json.loads(out.read_text())
    assert sorted(figures) == ["1", "8"]
    for batch in figures.values():
        assert all(math.isfinite(batch[field]) and batch[field] > 0 for field in FIELDS)
        own = batch["engine_us_per_step"] - batch["ort_us_per_step"]
        assert math.isclose(batch["engine_own_us_per_step"], own, rel_tol=1e-9)
        assert math.isclose(
            batch["engine_over_ort"],
            batch["ort_us_per_step"] / batch["engine_us_per_step"],
            rel_tol=1e-9,
        )


def test_eviction_needs_the_replayed_run() -> None:
    done = _run("--batches", "1", "--evict-mb", "1")
    assert done.returncode == 2
    assert "--evict-mb needs --python-only" in done.stderr
