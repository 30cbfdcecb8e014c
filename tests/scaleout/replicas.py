"""Replicas in one process: engines on one model repository parking into one real Redis
under one key prefix, for tests that drive both sides of a move by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from rnnserve.server.app import session_listener
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository

#: No reaper rounds of their own: the tests park when they say.
BY_HAND = EngineConfig(reap_interval_s=3600)


@asynccontextmanager
async def engines_sharing(
    repository: Path,
    redis_url: str,
    prefix: str,
    config: EngineConfig = BY_HAND,
    count: int = 2,
    *,
    metered: bool = False,
) -> AsyncIterator[list[Engine]]:
    """``count`` started engines (replica ids of their own), stopped and their store
    connections closed on the way out. ``metered``: their session events update their
    metrics (open sessions, sessions ended) as a server's do."""
    engines: list[Engine] = []
    try:
        for _ in range(count):
            store = RedisStateStore(redis_url, prefix)
            metrics = Metrics()
            on_event = session_listener(metrics) if metered else None
            engine = Engine(load_repository(repository), metrics, config, store, on_event)
            await engine.start()
            engines.append(engine)
        yield engines
    finally:
        for engine in engines:
            await engine.stop()
            assert engine.state_store is not None
            await engine.state_store.close()
