"""``python -m rnnserve.bench.engine_pipe``: the engine process's capacity over the pipe.

Speed is never asserted; the test proves the tool runs a real engine process and real load
processes over the real pipe, every step answered, and reports figures for each session count.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

FIELDS = ("steps_per_s", "engine_cpu_us_per_step", "engine_busy", "load_cpu_us_per_step")


def test_reports_the_engine_process_per_session_count(tmp_path: Path) -> None:
    out = tmp_path / "pipe.json"
    done = subprocess.run(
        [sys.executable, "-m", "rnnserve.bench.engine_pipe", "--sessions", "3", "8",
         "--load-procs", "2", "--seconds", "0.3", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())
    assert sorted(figures) == ["3", "8"]
    for batch in figures.values():
        assert all(math.isfinite(batch[field]) and batch[field] > 0 for field in FIELDS)
        assert batch["engine_busy"] <= 1.5  # one process: about one core at most
