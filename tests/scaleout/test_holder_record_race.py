"""A live session must never be NOT_FOUND on another replica while its holder record is late.

A replica records itself as a session's holder in the state store *in the background*
(``Parking.hold``): after it opens, forks or takes a session it answers the call first and
writes ``<key>#holder`` when its loop gets to it. Until then another replica asked for the
session finds it neither parked nor moving, and either no holder at all (a new session) or
itself as the holder (the record it left when the session was released to the other one):
it answers NOT_FOUND, which tells a client its session is gone and to start over.

The mixed soak (``tests/reliability/test_soak_topologies.py``, two replicas, each call of a
lane on the other replica than the last) hits this dozens of times per run on a loaded
2-core machine. Here the late write is made deterministic by holding back the replica's
``set_holder`` for a moment, as a busy event loop does. The fix belongs in
``engine/residency.py`` / ``engine/state_store.py`` (write the holder record before the call
is answered), hence ``xfail(strict)`` for opens; a take names its taker as holder in the same
atomic script that takes the record, so that case holds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository

from .redis_server import RedisServer

OWNER = "alice"
LATE_S = 0.3  # how long a replica's holder write is held back
_prefixes = itertools.count()

_LATE_HOLDER = pytest.mark.xfail(
    strict=True,
    reason="holder records of opened and forked sessions are written in the background after "
    "the call is answered: another replica answers NOT_FOUND for a live session until the "
    "write lands (engine/residency.py Parking.hold)",
)


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Engine]]:
    repo = build_test_repository(
        tmp_path / "repo", {"max_queue_delay_us": 0, "max_sessions": 8, "idle_timeout_s": 60}
    )
    prefix = f"holder-race{next(_prefixes)}:"
    engines = []
    for _ in range(2):
        store = RedisStateStore(redis_server.url, prefix)
        engine = Engine(load_repository(repo), Metrics(), EngineConfig(reap_interval_s=3600), store)
        await engine.start()
        engines.append(engine)
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.stop()
            assert engine.state_store is not None
            await engine.state_store.close()


def _late_holder_writes(engine: Engine) -> None:
    """From now on ``engine`` writes its holder records LATE_S after it is asked to."""
    store = engine.state_store
    assert store is not None
    write = store.set_holder

    async def late(session_id: str, owner: str, holder: str, ttl_s: float) -> None:
        await asyncio.sleep(LATE_S)
        await write(session_id, owner, holder, ttl_s)

    store.set_holder = late  # type: ignore[method-assign]


@_LATE_HOLDER
async def test_a_session_just_opened_on_one_replica_is_found_by_the_other(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    _late_holder_writes(a)
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    # Answered NOT_FOUND (SESSION_NOT_FOUND) while A's holder record is on its way.
    assert (await b.get_session("s1", OWNER)).position == 0


async def test_a_session_just_taken_by_one_replica_is_found_by_the_one_it_left(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await asyncio.sleep(0.1)  # A's holder record is written
    _late_holder_writes(b)
    assert (await b.get_session("s1", OWNER)).position == 0  # called back from A
    # A finds itself still named as the holder and answers NOT_FOUND.
    assert (await a.get_session("s1", OWNER)).position == 0
