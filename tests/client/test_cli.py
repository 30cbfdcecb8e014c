"""``rnnserve step`` and ``rnnserve stream`` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rnnserve.client import Client

from .reference import as_dict, assert_outputs_close, reference


def _rnnserve(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from rnnserve.server.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_step_prints_output_and_position(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    x = [[0.1, 0.2, 0.3, 0.4], [0.5, -0.6, 0.7, -0.8]]
    result = _rnnserve("step", "--target", target, "--model", "tiny_lstm", "--input", json.dumps(x))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["position"] == 2
    with Client(target) as client:
        model = client.get_model("tiny_lstm")
    expected = reference(sdk_testing, sdk_repository, model, np.asarray(x, np.float32))
    got = (
        as_dict({k: np.asarray(v) for k, v in printed["output"].items()}, model)
        if isinstance(printed["output"], dict)
        else as_dict(np.asarray(printed["output"], np.float32), model)
    )
    assert_outputs_close(got, expected)


def test_stream_prints_every_step(target: str) -> None:
    result = _rnnserve("stream", "--target", target, "--model", "tiny_gru", "--steps", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == [f"step {i}" for i in range(1, 6)]
    assert "position 5" in lines[4]
    assert lines[5].startswith("5 steps: median")


def test_an_unknown_model_exits_with_the_error(target: str) -> None:
    result = _rnnserve("step", "--target", target, "--model", "nope", "--input", "[[0,0,0,0]]")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_an_input_that_is_not_numbers_exits_with_the_error_not_a_traceback(target: str) -> None:
    for given in ('[["a", "b", "c", "d"]]', '{"x": 1}', "[[1, 2, 3, 4], [5]]"):
        result = _rnnserve("step", "--target", target, "--model", "tiny_lstm", "--input", given)
        assert result.returncode == 1, (given, result.stderr)
        assert "INVALID_ARGUMENT" in result.stderr and "Traceback" not in result.stderr, given


def test_the_python_example_runs(target: str) -> None:
    example = Path(__file__).parents[2] / "examples" / "python" / "stream_session.py"
    result = subprocess.run(
        [sys.executable, str(example), "--target", target, "--model", "tiny_lstm"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "after close: SessionClosed (SESSION_CLOSED)" in result.stdout
    # Streamed outputs come back in order; what it prints of each is true of that step (the
    # session's position moves as replies arrive, several at once, so it is shown after).
    streamed = [line for line in result.stdout.splitlines() if line.startswith("streamed")]
    assert streamed == [f"streamed: timestep {t}, output (1, 1, 8)" for t in range(2, 6)], streamed
    assert "after the stream: position 6" in result.stdout, result.stdout
