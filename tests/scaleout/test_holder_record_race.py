"""A live session must never be NOT_FOUND on another replica while its holder record is late.

Another replica asked for a session finds it neither parked nor moving; only the holder
record (``<key>#holder``) says a live replica has it. If that record were written after the
call that made the session resident was answered, a client's next call landing elsewhere
(the two-replica soak does this on every call) would get NOT_FOUND, which tells it its
session is gone. So an open or a fork is answered only once the record is written (for a
client-chosen id, by the claim that reserves the id before it is opened), and a take names
its taker in the same atomic script that takes the record. Here the replica's holder writes
(``set_holder`` and ``claim``) are held back for a moment, as a busy event loop or a slow
store does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from rnnserve.server.engine.core import Engine
from rnnserve.testing import build_test_repository

from .redis_server import RedisServer
from .replicas import engines_sharing

OWNER = "alice"
LATE_S = 0.3  # how long a replica's holder write is held back
_prefixes = itertools.count()


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Engine]]:
    repo = build_test_repository(
        tmp_path / "repo", {"max_queue_delay_us": 0, "max_sessions": 8, "idle_timeout_s": 60}
    )
    async with engines_sharing(repo, redis_server.url, f"holder-race{next(_prefixes)}:") as engines:
        yield engines


def _late_holder_writes(engine: Engine) -> None:
    """From now on ``engine`` writes its holder records (and claims ids, which writes them)
    LATE_S after it is asked to."""
    store = engine.state_store
    assert store is not None
    write, claim = store.set_holder, store.claim

    async def late(session_id: str, owner: str, holder: str, ttl_s: float) -> None:
        await asyncio.sleep(LATE_S)
        await write(session_id, owner, holder, ttl_s)

    async def late_claim(
        session_id: str,
        owner: str,
        holder: str,
        ttl_s: float,
        token: str,
        earlier: Sequence[str] = (),
    ) -> bool:
        await asyncio.sleep(LATE_S)
        return await claim(session_id, owner, holder, ttl_s, token, earlier)

    store.set_holder = late  # type: ignore[method-assign]
    store.claim = late_claim  # type: ignore[method-assign]


async def test_a_session_just_opened_on_one_replica_is_found_by_the_other(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    _late_holder_writes(a)
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    # The open was answered once A's holder record was written, however slow the write.
    assert (await b.get_session("s1", OWNER)).position == 0


async def test_a_session_just_forked_on_one_replica_is_found_by_the_other(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    _late_holder_writes(a)
    await a.fork_session("s1", "s1-fork", OWNER)
    assert (await b.get_session("s1-fork", OWNER)).position == 0


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
