"""``rnnserve bench --quick`` against a real server: every section present, numbers sane.

Speed is never asserted here (that is what the benchmark's ratios are for); the test proves
the benchmark runs end to end, measures something, and writes what it promises.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rnnserve.testing")
pytest.importorskip("matplotlib")

SECTIONS = (
    "machine",
    "model",
    "provider",
    "transport_floor",
    "model_floor",
    "rnnserve",
    "latency_cdf",
    "targets",
)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from rnnserve.server.cli import main; main()",
            "bench",
            "--quick",
            "--out-dir",
            str(out),
            "--name",
            "quick",
            "--rounds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "quick.json").read_text()), out, done.stdout


def test_every_section_is_written(quick_run: tuple[dict, Path, str]) -> None:
    doc, out, _ = quick_run
    assert all(section in doc for section in SECTIONS)
    for key in ("cpu_model", "cores", "python", "grpcio", "onnxruntime", "numpy"):
        assert doc["machine"][key]
    assert doc["provider"] and all(isinstance(p, str) for p in doc["provider"])
    assert (out / "quick-latency-cdf.png").stat().st_size > 1000
    assert (out / "quick-throughput.png").stat().st_size > 1000


def test_floors_are_positive(quick_run: tuple[dict, Path, str]) -> None:
    doc, _, _ = quick_run
    transport = doc["transport_floor"]
    assert _positive(transport["step"]["1"]["p50_s"])
    for n in ("1", "16", "64", "256"):
        assert _positive(transport["stream"][n]["messages_per_s"]), n
        assert transport["stream"][n]["errors"] == 0
    for batch in ("1", "64", "256"):
        assert _positive(doc["model_floor"][batch]["steps_per_s"])


def test_rnnserve_sections_are_sane(quick_run: tuple[dict, Path, str]) -> None:
    doc, _, _ = quick_run
    served = doc["rnnserve"]
    for mode in ("step", "stream"):
        lat = served["latency"][mode]
        assert _positive(lat["p50_s"]) and lat["p99_s"] >= lat["p50_s"]
    for n in ("1", "16", "64", "256", "1024"):
        run = served["throughput"]["stream"][n]
        assert run["errors"] == 0, run.get("first_error")
        assert _positive(run["steps_per_s"]), n
    for n in ("256", "1024"):
        assert _positive(served["throughput"]["coalesced"][n]["steps_per_s"])
    assert _positive(served["batching"]["on"]["steps_per_s"])
    assert _positive(served["batching"]["off"]["steps_per_s"])
    for k in ("1", "8", "32"):
        assert _positive(served["chunks"][k]["timesteps_per_s"])
    (memory,) = served["memory"].values()
    assert memory["sessions"] > 0 and memory["rss_after_bytes"] > 0


def test_every_target_is_judged_and_printed(quick_run: tuple[dict, Path, str]) -> None:
    doc, _, stdout = quick_run
    names = " ".join(row["target"] for row in doc["targets"])
    for fragment in ("latency", "256 sessions", "batching", "K=32", "RSS per open session"):
        assert fragment in names
    for row in doc["targets"]:
        assert isinstance(row["met"], bool) and math.isfinite(row["value"])
    assert "pass" in stdout or "FAIL" in stdout


def test_each_side_of_a_ratio_keeps_its_best_of_alternating_rounds(
    quick_run: tuple[dict, Path, str],
) -> None:
    doc, _, _ = quick_run
    served = doc["rnnserve"]
    points = [
        doc["transport_floor"]["step"]["1"],
        doc["transport_floor"]["stream"]["64"],
        served["latency"]["step"],
        served["throughput"]["stream"]["256"],
        served["throughput"]["coalesced"]["256"],
        served["batching"]["off"],
        served["chunks"]["32"],
        served["sync_client"],
        served["sync_client"]["aio_step"],
        served["frontends"]["2"]["256"],
        doc["model_floor"]["64"],
        doc["engine_floor"]["256"],
    ]
    for point in points:
        rounds = point["rounds_steps_per_s"]
        assert len(rounds) == 2 and all(_positive(r) for r in rounds), point
        assert point["steps_per_s"] == max(rounds), point
