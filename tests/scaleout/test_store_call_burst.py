"""A burst of calls for parked sessions must not make a healthy state store look down.

redis-py (8.x) gives ``Redis.from_url`` a connection pool of at most 100 connections that
raises ``MaxConnectionsError("Too many connections")`` for the 101st concurrent command
instead of waiting for a free connection; taken for an outage, every call for a parked
session answered UNAVAILABLE ``STATE_STORE_UNAVAILABLE`` for a second (parking skipped too),
with Redis itself fine. The full-size parking soak (400 lanes waking together,
``tests/reliability/test_soak_topologies.py``) hit it. ``RedisStateStore`` now uses a pool
that waits for a free connection.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import numpy as np
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.errors import RnnserveError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository
from server.helpers import Collector

from .redis_server import RedisServer

OWNER = "alice"
SESSIONS = 150  # more calls at once than redis-py's default pool has connections (100)
_prefixes = itertools.count()


async def test_many_parked_sessions_called_at_once_all_come_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = build_test_repository(
        tmp_path / "repo", {"max_queue_delay_us": 0, "max_sessions": 200, "idle_timeout_s": 60}
    )
    store = RedisStateStore(redis_server.url, f"burst{next(_prefixes)}:")
    engine = Engine(
        load_repository(repo),
        Metrics(),
        EngineConfig(reap_interval_s=3600, park_after_s=0.01),
        store,
    )
    await engine.start()
    try:
        ids = [f"s{i}" for i in range(SESSIONS)]
        sink = Collector()
        x = np.zeros((1, 4), np.float32)
        for n, session_id in enumerate(ids):
            await engine.open_session("tiny_rnn", "", session_id, {}, 0, OWNER)
            engine.submit([(n, session_id, {"x": x}, None, None)], OWNER, sink)
        assert all(o.error is None for o in await sink.wait_for(SESSIONS))
        await asyncio.sleep(0.05)
        assert await engine.residency.park_idle() == SESSIONS
        found = await asyncio.gather(
            *(engine.get_session(i, OWNER) for i in ids), return_exceptions=True
        )
        failed = [f for f in found if isinstance(f, RnnserveError)]
        assert not failed, f"{len(failed)} of {SESSIONS}: {failed[0].reason} {failed[0]}"
        assert [f.position for f in found] == [1] * SESSIONS  # type: ignore[union-attr]
    finally:
        await engine.stop()
        await store.close()
