"""A small run of the scale-out benchmark (tests/scaleout/bench.py); prints its figures.

Slow: it starts two servers and parks thousands of sessions. The numbers are reported, not
asserted (timings depend on the machine); what is checked is that every measured session
really went through the store.
"""

from __future__ import annotations

import json

import pytest

from .bench import run


@pytest.mark.slow
async def test_scaleout_benchmark_runs_and_reports() -> None:
    report = await run(None, latency_n=200, held_n=5000, slots=8, rounds=3, concurrency=8)
    print(json.dumps(report, indent=2))
    assert report["held"]["sessions_parked"] == 5000
    assert report["latency"]["unpark"]["n"] == 200
    assert report["throughput"]["parking_10x_steps_per_s"] > 0
