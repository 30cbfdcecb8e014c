"""A saturated engine waits longer for a batch's cohort; an idle one does not.

Two sessions step together, then one steps again and the other follows 20 ms later (still
inside the 50 ms for which a session that stepped is waited for). With a 1 ms queue delay an
idle engine runs the first step alone after that delay; an engine whose event loop has been
busy for the last 100 ms waits up to ``busy_queue_delay_us`` (here 40 ms) and runs both steps
as one batch. A config whose busy delay is shorter than its queue delay is refused at load.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server.config import ConfigError, load_model_config
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository

from .helpers import Collector, running_engine

OWNER = "tester"
MODEL = "tiny_gru"


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(
        tmp_path_factory.mktemp("busy-delay"),
        {"max_queue_delay_us": 1000, "busy_queue_delay_us": 40_000, "max_sessions": 8},
    )


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4)).astype(np.float32)


async def _burn(stop: asyncio.Event) -> None:
    """Keep the event loop busy: CPU in 1 ms slices, yielding between them."""
    while not stop.is_set():
        until = time.perf_counter() + 0.001
        while time.perf_counter() < until:
            pass
        await asyncio.sleep(0)


async def _second_round_batches(repo_path: Path, busy: bool) -> bool:
    """Whether the first session's second step ran in one batch with the other's."""
    async with running_engine(load_repository(repo_path)) as engine:
        stop = asyncio.Event()
        burner = asyncio.get_running_loop().create_task(_burn(stop)) if busy else None
        try:
            first, second = [
                (await engine.open_session(MODEL, "", "", {}, 0, OWNER)).session_id
                for _ in range(2)
            ]
            warm = Collector()  # the engine's first batch starts its first load window
            engine.submit([(9, first, {"x": _x(9)}, None, None)], OWNER, warm)
            await warm.wait_for(1)
            await asyncio.sleep(0.25)  # a whole load window of burning (or of idling)
            together = Collector()
            engine.submit(
                [(0, first, {"x": _x(0)}, None, None), (1, second, {"x": _x(1)}, None, None)],
                OWNER,
                together,
            )
            await together.wait_for(2)
            alone, later = Collector(), Collector()
            engine.submit([(2, first, {"x": _x(2)}, None, None)], OWNER, alone)
            await asyncio.sleep(0.02)
            engine.submit([(3, second, {"x": _x(3)}, None, None)], OWNER, later)
            (a,) = await alone.wait_for(1)
            (b,) = await later.wait_for(1)
            assert a.error is None and b.error is None and a.position == 3 and b.position == 2
            return a.outputs is b.outputs  # one batch's outputs are shared by its outcomes
        finally:
            stop.set()
            if burner is not None:
                await burner


async def test_an_idle_engine_runs_a_step_after_the_queue_delay(repo_path: Path) -> None:
    assert not await _second_round_batches(repo_path, busy=False)


async def test_a_saturated_engine_waits_for_the_cohort_up_to_the_busy_delay(
    repo_path: Path,
) -> None:
    assert await _second_round_batches(repo_path, busy=True)


def test_a_busy_delay_below_the_queue_delay_is_refused(tmp_path: Path) -> None:
    root = build_test_repository(
        tmp_path, {"max_queue_delay_us": 5000, "busy_queue_delay_us": 1000}
    )
    with pytest.raises(ConfigError, match=r"busy_queue_delay_us = 1000 is below"):
        load_model_config(root / MODEL / "config.toml")
