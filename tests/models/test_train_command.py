"""``rnnserve train``: trains on local data, reports against the baseline, saves and exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rnnserve.models.network import load_checkpoint


def _rnnserve(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "rnnserve.server", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_train_reports_the_baseline_and_exports_into_a_repository(tmp_path: Path) -> None:
    checkpoint = tmp_path / "spots.pt"
    done = _rnnserve(
        "train", "forecast", "--kind", "gru_torch", "--steps", "100",
        "--checkpoint", str(checkpoint), "--repository", str(tmp_path / "repo"), "--name", "spots",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = " ".join(done.stdout.split())  # the report may wrap at the terminal width
    assert "persistence" in output and "beats the baseline" in output
    assert load_checkpoint(checkpoint).spec.kind == "gru_torch"
    assert (tmp_path / "repo" / "spots" / "1" / "model.onnx").is_file()


def test_train_refuses_an_unknown_cell_kind(tmp_path: Path) -> None:
    done = _rnnserve(
        "train", "forecast", "--kind", "transformer", "--checkpoint", str(tmp_path / "x.pt")
    )
    assert done.returncode == 2
    assert "transformer" in done.stderr
    assert not (tmp_path / "x.pt").exists()
