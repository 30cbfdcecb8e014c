"""The event loop keeps polling for a short while after each step (``--busy-poll-us``), and
only then: an idle server sleeps, and 0 turns the poll off."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rnnserve.server.busy_poll import BusyPoll
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository

from .helpers import Collector

WINDOW_S = 0.05


async def _loop_cpu_share(seconds: float) -> float:
    """The share of ``seconds`` this thread (the event loop's) spent on the CPU meanwhile."""
    started = time.thread_time()
    await asyncio.sleep(seconds)
    return (time.thread_time() - started) / seconds


async def test_a_touch_polls_for_the_window_then_stops() -> None:
    poll = BusyPoll(WINDOW_S)
    assert not poll.polling
    poll.touch()
    assert poll.polling
    await asyncio.sleep(WINDOW_S / 2)
    assert poll.polling
    await asyncio.sleep(WINDOW_S * 2)
    assert not poll.polling


async def test_each_touch_moves_the_end_of_the_window() -> None:
    poll = BusyPoll(WINDOW_S)
    started = time.monotonic()
    while time.monotonic() - started < WINDOW_S * 3:  # touched for three windows' time
        poll.touch()
        await asyncio.sleep(WINDOW_S / 5)
        assert poll.polling
    await asyncio.sleep(WINDOW_S * 2)
    assert not poll.polling


async def test_a_window_of_zero_never_polls() -> None:
    poll = BusyPoll(0.0)
    poll.touch()
    assert not poll.polling
    await asyncio.sleep(0)
    assert not poll.polling


async def test_a_step_keeps_the_engines_loop_turning_and_an_idle_engine_sleeps(
    test_repository: Path,
) -> None:
    # While the poll runs the loop's thread stays on the CPU through a stretch where it
    # would otherwise wait in the selector; once the window has passed, it waits again.
    config = EngineConfig(busy_poll_s=0.3)
    engine = Engine(load_repository(test_repository), Metrics(), config)
    await engine.start()
    try:
        sid = (await engine.open_session("tiny_gru", "", "", {}, 0, "me")).session_id
        assert await _loop_cpu_share(0.1) < 0.1
        answers = Collector()
        engine.submit([(0, sid, {"x": np.zeros((1, 4), np.float32)}, None, None)], "me", answers)
        await answers.wait_for(1)
        assert await _loop_cpu_share(0.1) > 0.3
        await asyncio.sleep(0.3)
        assert await _loop_cpu_share(0.1) < 0.1
    finally:
        await engine.stop()


def test_a_busy_poll_out_of_range_is_refused_at_start(test_repository: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.server", "serve",
            "--repository", str(test_repository), "--port", "0", "--metrics-port", "-1",
            "--busy-poll-us", "-1",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--busy-poll-us must be between 0 and 100000, got -1" in done.stderr
