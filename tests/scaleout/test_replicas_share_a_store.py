"""Two replicas (in-process engines) parking into one real Redis: what one of them parked
may be taken, closed or handed off by the other, and each answers from the store's truth,
not from what it remembers parking.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.errors import RnnserveError
from rnnserve.testing import build_test_repository
from server.helpers import Collector

from .redis_server import RedisServer
from .replicas import engines_sharing

OWNER = "alice"
_prefixes = itertools.count()


@asynccontextmanager
async def _two_replicas(
    root: Path, redis_server: RedisServer, park_after_s: float | None
) -> AsyncIterator[list[Engine]]:
    """Replicas A and B on one key prefix; no reaper rounds (the tests run them by hand)."""
    repo = build_test_repository(
        root, {"max_queue_delay_us": 0, "max_sessions": 8, "idle_timeout_s": 2}
    )
    config = EngineConfig(reap_interval_s=3600, park_after_s=park_after_s)
    async with engines_sharing(
        repo, redis_server.url, f"replicas{next(_prefixes)}:", config
    ) as engines:
        yield engines


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Engine]]:
    """Replicas that park sessions idle for 10 ms (when a test runs a reaper round)."""
    async with _two_replicas(tmp_path / "repo", redis_server, 0.01) as engines:
        yield engines


async def _step(engine: Engine, session_id: str) -> None:
    sink = Collector()
    x = np.zeros((1, 4), np.float32)
    engine.submit([(0, session_id, {"x": x}, None, None)], OWNER, sink)
    (outcome,) = await sink.wait_for(1)
    assert outcome.error is None, outcome.error


async def _park(engine: Engine) -> None:
    await asyncio.sleep(0.05)  # past park_after_s
    assert await engine.residency.park_idle() >= 1


async def test_an_id_parked_here_then_closed_elsewhere_can_be_opened_here(
    replicas: list[Engine],
) -> None:
    # A remembered parking it and answered ALREADY_EXISTS until the idle timeout.
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await _step(a, "s1")
    await _park(a)
    assert (await b.get_session("s1", OWNER)).position == 1  # B takes it back
    await b.close_session("s1", OWNER)
    await asyncio.sleep(0.2)  # B drops its holder record in the background
    reopened = await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    assert reopened.position == 0


async def test_an_id_being_handed_off_cannot_be_opened_by_another_replica(
    replicas: list[Engine],
) -> None:
    # Opened on B while A's handoff was under way, the id lived twice: resident on B and
    # parked by A (whose old copy came back once B closed its own).
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await _step(a, "s1")
    assert await a.begin_drain() == 1
    with pytest.raises(RnnserveError) as moving:
        await b.get_session("s1", OWNER)
    assert moving.value.reason == errors.SESSION_MOVING
    assert moving.value.retry_after_s is not None  # a RetryInfo: retry shortly, not at once
    await a.residency.stop()
    with pytest.raises(RnnserveError) as taken:
        await b.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    assert taken.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert await a.residency.park_all() == 1
    assert (await b.get_session("s1", OWNER)).position == 1  # A's, handed off whole


async def test_a_parked_session_expires_on_its_idle_timeout_and_a_read_does_not_revive_it(
    replicas: list[Engine],
) -> None:
    # The parked key lived a whole idle timeout from the park, and each GetSession that
    # brought it back restarted its clock: polled, it never expired.
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await _step(a, "s1")
    await asyncio.sleep(1.2)  # idle for most of its 2 s
    await _park(a)
    assert (await b.get_session("s1", OWNER)).position == 1  # a read, not a use
    await asyncio.sleep(1.0)  # 2.2 s since its last step
    for replica in (b, a):
        with pytest.raises(RnnserveError) as expired:
            await replica.get_session("s1", OWNER)
        assert expired.value.code == grpc.StatusCode.NOT_FOUND
    assert expired.value.reason in (errors.SESSION_EXPIRED, errors.SESSION_NOT_FOUND)


async def test_releasing_a_streams_sessions_closes_those_parked_meanwhile(
    replicas: list[Engine],
) -> None:
    # Only resident sessions were closed: one parked while its stream was open outlived it.
    a, _ = replicas
    for session_id in ("stays", "parks"):
        await a.open_session("tiny_rnn", "", session_id, {}, 0, OWNER)
        await _step(a, session_id)
    await _park(a)
    await _step(a, "stays")  # back in its slot; "parks" stays in the store
    assert a.store.resident("parks", OWNER) is None
    assert await a.close_sessions(["stays", "parks"], OWNER) == 2
    for session_id in ("stays", "parks"):
        with pytest.raises(RnnserveError) as closed:
            await a.get_session(session_id, OWNER)
        assert closed.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_session_opened_while_the_store_was_down_is_found_by_the_others_after(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Its holder record was lost with the outage and never written: B answered NOT_FOUND for
    # a session live on A, and could open its id a second time.
    async with _two_replicas(tmp_path / "repo", redis_server, None) as (a, b):
        await _found_after_an_outage(a, b, redis_server)


async def _found_after_an_outage(a: Engine, b: Engine, redis_server: RedisServer) -> None:
    redis_server.client().save()
    redis_server.kill()
    with pytest.raises(RnnserveError) as down:  # a chosen id needs the store: A sees it down
        await a.open_session("tiny_rnn", "", "chosen", {}, 0, OWNER)
    assert down.value.reason == errors.STATE_STORE_UNAVAILABLE
    opened = await a.open_session("tiny_rnn", "", "", {}, 0, OWNER)  # resident: no store needed
    await _step(a, opened.session_id)
    redis_server.start()
    # Reaper rounds (no parking) write what the outage kept out, once the store answers again
    # (past its fail-fast window; a pooled connection from before the restart may fail once).
    assert a.state_store is not None
    holder = a.state_store.holder_key(opened.session_id, OWNER)
    deadline = asyncio.get_running_loop().time() + 10.0
    while redis_server.client().get(holder) is None:
        assert asyncio.get_running_loop().time() < deadline, "the holder record was not rewritten"
        await asyncio.sleep(0.2)
        await a.residency.park_idle()
    assert a.store.resident(opened.session_id, OWNER) is not None
    assert (await b.get_session(opened.session_id, OWNER)).position == 1  # called back from A


async def test_a_session_parked_by_a_draining_holder_between_two_looks_is_taken(
    replicas: list[Engine],
) -> None:
    """B asks for a session A holds, just as A drains: B's first look at the store finds
    nothing parked, A then parks the session (its moving mark going with the write) and stops
    listening for release requests. B finds A named as holder, and nobody answers A's
    channel; the session is in the store all the same, so B takes it instead of answering
    NOT_FOUND for a live session."""
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await _step(a, "s1")
    store = b.state_store
    assert store is not None
    look = store.peek
    looks = 0

    async def first_look_then_a_drains(session_id: str, owner: str) -> object:
        nonlocal looks
        looks += 1
        found = await look(session_id, owner)
        if looks == 1:
            assert found is None
            await a.stop()  # A hands s1 off: parked, and no longer listening
        return found

    store.peek = first_look_then_a_drains  # type: ignore[method-assign]
    assert (await b.get_session("s1", OWNER)).position == 1


async def test_a_session_taken_by_a_draining_replica_is_moving_not_gone(
    replicas: list[Engine],
) -> None:
    """A call admitted before A's drain gate closed takes a session from the store after the
    drain marked A's sessions moving; A then stops listening for release requests before it
    parks. B asked for that session meanwhile must answer "retry" (SESSION_MOVING), and find
    it once A has handed it off, never NOT_FOUND for a live session."""
    a, b = replicas
    await b.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await _step(b, "s1")
    await _park(b)
    await a.begin_drain()
    assert (await a.get_session("s1", OWNER)).position == 1  # taken after the marking
    await a.residency.stop()  # no more release requests; not parked yet
    with pytest.raises(RnnserveError) as caught:
        await b.get_session("s1", OWNER)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == errors.SESSION_MOVING
    await a.stop()  # the handoff
    assert (await b.get_session("s1", OWNER)).position == 1


async def test_a_session_closed_during_a_drain_is_not_left_moving(
    replicas: list[Engine], redis_server: RedisServer
) -> None:
    """A drain marks its sessions moving; one closed before the handoff is not on its way
    anywhere: its mark goes with it, so the other replica answers NOT_FOUND at once instead
    of "retry" until the mark expires."""
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    await a.begin_drain()
    await a.close_session("s1", OWNER)
    await asyncio.sleep(0.05)  # the background unmark
    assert not [k for k in redis_server.client().keys("*") if k.endswith(b"s1#moving")]
    with pytest.raises(RnnserveError) as caught:
        await b.get_session("s1", OWNER)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


async def test_a_drain_marks_busy_sessions_moving_too(
    replicas: list[Engine], redis_server: RedisServer
) -> None:
    """A session with a step in flight when the drain starts (the usual case under load) is
    on its way to the store as much as an idle one: marked moving, so the other replica
    answers "retry" until it is handed off."""
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    session = a.store.resident("s1", OWNER)
    assert session is not None
    with a.store.held(session):  # as a step in flight holds it
        assert await a.begin_drain() == 1
    assert [k for k in redis_server.client().keys("*") if k.endswith(b"s1#moving")]
    await a.residency.stop()  # no more release requests; not parked yet
    with pytest.raises(RnnserveError) as caught:
        await b.get_session("s1", OWNER)
    assert caught.value.reason == errors.SESSION_MOVING
