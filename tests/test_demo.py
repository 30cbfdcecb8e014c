"""``make demo``, the README's first command: ``examples/demo.py`` serves a repository, streams
from a client and stops the server cleanly. Run here as a user runs it, in its own process, on
the trained default repository (every show: text, forecasts) and on none at all (the
hand-built models of every cell kind, each streamed step by step against one Predict)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def _demo(repository: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(DEMO), "--repository", str(repository)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "server exited with code 0" in done.stdout
    return done.stdout


def test_the_demo_shows_every_default_model(default_repository: Path) -> None:
    out = _demo(default_repository)
    assert "[charlm] prompt 'def ', then 160 characters one Step each:" in out
    assert "session position 165" in out  # "\n" + the prompt, then one Step per character
    for name in ("gru", "gru_torch", "lstm", "peephole_lstm", "rnn"):
        row = re.search(rf"^  sunspots_{name} +([\d.]+) +([\d.]+) +\d+$", out, re.MULTILINE)
        assert row is not None, out
        assert float(row[1]) < float(row[2])  # each forecaster beats persistence


def test_the_demo_without_a_repository_streams_every_cell_kind(tmp_path: Path) -> None:
    out = _demo(tmp_path / "nothing-here")
    assert "has no models; serving the hand-built model of every cell kind" in out
    errors = re.findall(r"max \|stepwise - whole sequence\| = ([\d.e+-]+)", out)
    assert len(errors) >= 4, out
    assert all(float(error) < 1e-4 for error in errors)
