"""ForkSession on a server with a state store: the fork awaits the store (is the new id taken
anywhere? is there room?), and the source may step, reset or close meanwhile. The fork gets
the source's state and position as they were at one instant, never the state of one moment
with the position of another.

An engine in this process, parking into a real ``redis-server``; the source's step is
submitted while the fork is awaiting Redis, and runs at once (nothing else queued).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.errors import RnnserveError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository, run_reference
from server.helpers import Collector

from .redis_server import RedisServer

OWNER = "alice"
_prefixes = itertools.count()


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4)).astype(np.float32)


class Parking(NamedTuple):
    engine: Engine
    repository: Path


@pytest.fixture
async def parking(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Parking]:
    """An engine parking into Redis, with one session "source" of tiny_rnn at position 0."""
    repo = build_test_repository(tmp_path / "repo", {"max_queue_delay_us": 0, "max_sessions": 8})
    store = RedisStateStore(redis_server.url, f"fork{next(_prefixes)}:")
    engine = Engine(load_repository(repo), Metrics(), EngineConfig(), store)
    await engine.start()
    await engine.open_session("tiny_rnn", "", "source", {}, 0, OWNER)
    try:
        yield Parking(engine, repo)
    finally:
        await engine.stop()
        await store.close()


async def _fork_started(engine: Engine, new_id: str) -> asyncio.Task:
    """A fork of "source", left awaiting the state store."""
    fork = asyncio.create_task(engine.fork_session("source", new_id, OWNER))
    await asyncio.sleep(0)
    assert not fork.done()
    return fork


async def _state(engine: Engine, session_id: str) -> tuple[int, np.ndarray]:
    info, state = await engine.export_state(session_id, OWNER)
    return info.position, state["initial_h"]


async def test_a_step_of_the_source_while_the_fork_waits_moves_state_and_position_together(
    parking: Parking,
) -> None:
    engine = parking.engine
    fork = await _fork_started(engine, "child")
    sink = Collector()
    engine.submit([(0, "source", {"x": _x(1)}, None, None)], OWNER, sink)
    (stepped,) = await sink.wait_for(1)
    assert stepped.error is None and stepped.position == 1
    await fork

    source_position, source_state = await _state(engine, "source")
    child_position, child_state = await _state(engine, "child")
    assert child_position == source_position == 1
    np.testing.assert_array_equal(child_state, source_state)
    want = run_reference(parking.repository, "tiny_rnn", "1", {"x": _x(1)})
    np.testing.assert_allclose(child_state, want["initial_h"], rtol=1e-5, atol=1e-6)


async def test_a_reset_of_the_source_while_the_fork_waits_gives_the_fork_the_reset_state(
    parking: Parking,
) -> None:
    engine = parking.engine
    sink = Collector()
    engine.submit([(0, "source", {"x": _x(2)}, None, None)], OWNER, sink)
    await sink.wait_for(1)
    fork = await _fork_started(engine, "child")
    await engine.reset_session("source", {}, OWNER)
    await fork

    child_position, child_state = await _state(engine, "child")
    assert child_position == 0
    assert not child_state.any()  # the state of position 0, not the stepped one


async def test_a_source_closed_while_the_fork_waits_fails_the_fork_not_found(
    parking: Parking,
) -> None:
    engine = parking.engine
    fork = await _fork_started(engine, "child")
    await engine.close_session("source", OWNER)
    with pytest.raises(RnnserveError) as failed:
        await fork
    assert failed.value.code == grpc.StatusCode.NOT_FOUND
    assert "ended while the fork waited" in failed.value.message
    with pytest.raises(RnnserveError):
        await engine.get_session("child", OWNER)
