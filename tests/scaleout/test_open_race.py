"""Two replicas asked at the same moment to open one client-chosen session id: exactly one
gets it, the other answers ALREADY_EXISTS, and the id lives once.

A replica that opens a client-chosen id claims it in the shared store, in one atomic step:
refused while the caller's session of that id is parked, on its way out of the store, being
handed off, or held by another replica that is running; otherwise the claimer is named its
holder. Looking first and writing the holder record afterwards let two replicas both find
the id free and both open it: two sessions of one id, each stepping on its own state, which
one a call reached depending on the replica it landed on. A fork to a client-chosen id
claims it the same way.

Two engines in this process share one real ``redis-server`` under one key prefix; their
session events update their metrics as a server's do.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.engine.store import SessionInfo
from rnnserve.server.errors import RnnserveError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository
from server.helpers import Collector

from .redis_server import RedisServer
from .replicas import engines_sharing

OWNER = "alice"
MODEL = "tiny_rnn"
#: Races run per test, each on a fresh id: a check-then-write lets both replicas win most of
#: them, so a handful would do; more make a lucky interleaving as good as impossible.
ROUNDS = 25
_prefixes = itertools.count()


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Engine]]:
    """Replicas A and B, both listening for release requests (so each sees the other as a
    running replica), no reaper rounds of their own."""
    async with _replicas(tmp_path, redis_server, EngineConfig(reap_interval_s=3600)) as engines:
        yield engines


async def _replicas_listening(engines: list[Engine]) -> None:
    """Wait until each engine takes release requests: until then the other takes it for a
    replica that is gone, whose holder records stand for nothing."""
    for asker, holder in itertools.permutations(engines, 2):
        assert asker.state_store is not None
        for _ in range(200):
            if await asker.state_store.holder_alive(holder.residency.replica_id):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("a replica does not listen for release requests")


@asynccontextmanager
async def _replicas(
    tmp_path: Path, redis_server: RedisServer, config: EngineConfig
) -> AsyncIterator[list[Engine]]:
    """Two metered replicas on a fresh key prefix, listening for each other."""
    repo = build_test_repository(
        tmp_path / "repo",
        {"max_queue_delay_us": 0, "max_sessions": 2 * ROUNDS + 4, "idle_timeout_s": 60},
    )
    prefix = f"open-race{next(_prefixes)}:"
    async with engines_sharing(repo, redis_server.url, prefix, config, metered=True) as engines:
        await _replicas_listening(engines)
        yield engines


async def _outcome(call: Awaitable[SessionInfo]) -> SessionInfo | RnnserveError:
    try:
        return await call
    except RnnserveError as exc:
        return exc


async def _race(
    first: Awaitable[SessionInfo], second: Awaitable[SessionInfo]
) -> tuple[SessionInfo | RnnserveError, SessionInfo | RnnserveError]:
    """Both calls started in the same turn of the event loop, each answered."""
    one, two = await asyncio.gather(_outcome(first), _outcome(second))
    return one, two


def _one_succeeded(outcomes: tuple[SessionInfo | RnnserveError, ...]) -> tuple[int, SessionInfo]:
    """Which of two calls succeeded, and its answer; the other must have been refused with
    ALREADY_EXISTS."""
    won = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, SessionInfo)]
    assert len(won) == 1, f"both or neither succeeded: {outcomes}"
    refused = outcomes[1 - won[0]]
    assert isinstance(refused, RnnserveError)
    assert refused.code == grpc.StatusCode.ALREADY_EXISTS, refused
    assert refused.reason == errors.SESSION_EXISTS
    info = outcomes[won[0]]
    assert isinstance(info, SessionInfo)
    return won[0], info


def _winner_and_loser(
    engines: tuple[Engine, Engine], outcomes: tuple[SessionInfo | RnnserveError, ...]
) -> tuple[Engine, SessionInfo, Engine]:
    """The engine whose call succeeded, its answer, and the other one (refused)."""
    winner, info = _one_succeeded(outcomes)
    return engines[winner], info, engines[1 - winner]


async def _held_by_winner_only(
    redis_server: RedisServer, winner: Engine, loser: Engine, session_id: str
) -> None:
    """The session lives on the winner alone: resident there, not on the loser, and the
    store holds nothing of its id but the winner's holder record (and its claim's token)."""
    assert winner.store.resident(session_id, OWNER) is not None
    assert loser.store.resident(session_id, OWNER) is None
    store = winner.state_store
    assert store is not None
    assert await store.holder(session_id, OWNER) == winner.residency.replica_id  # type: ignore[attr-defined]
    key = store.key(session_id, OWNER)  # type: ignore[attr-defined]
    found = sorted(redis_server.client().keys(key + "*"))
    assert found == [key.encode() + b"#claim", key.encode() + b"#holder"]


def _open(engine: Engine, session_id: str) -> Awaitable[SessionInfo]:
    return engine.open_session(MODEL, "", session_id, {}, 0, OWNER)


async def _step(engine: Engine, session_id: str) -> int:
    """One step of ``session_id`` on ``engine``; its new position."""
    sink = Collector()
    engine.submit([(0, session_id, {"x": np.ones((1, 4), np.float32)}, None, None)], OWNER, sink)
    (outcome,) = await sink.wait_for(1)
    assert outcome.error is None, outcome.error
    return outcome.position


def _open_sessions(engine: Engine) -> float:
    """rnnserve_active_sessions of the test model on ``engine``."""
    value = engine.metrics.registry.get_sample_value(
        "rnnserve_active_sessions", {"model": MODEL, "version": "1"}
    )
    return value or 0.0


async def test_two_replicas_opening_one_id_at_once_open_it_once(
    replicas: list[Engine], redis_server: RedisServer
) -> None:
    a, b = replicas
    wins = {id(a): 0, id(b): 0}
    for round_ in range(ROUNDS):
        session_id = f"same-{round_}"
        pair = (a, b) if round_ % 2 else (b, a)  # either replica asks first
        outcomes = await _race(_open(pair[0], session_id), _open(pair[1], session_id))
        winner, info, loser = _winner_and_loser(pair, outcomes)
        assert (info.session_id, info.position) == (session_id, 0)
        await _held_by_winner_only(redis_server, winner, loser, session_id)
        wins[id(winner)] += 1
    # The losers left nothing behind: no slot taken, no open session counted.
    for engine in (a, b):
        assert len(engine.store) == wins[id(engine)]
        assert engine.store.slots_in_use(engine.repository.get(MODEL, "1")) == wins[id(engine)]
        assert _open_sessions(engine) == wins[id(engine)]


async def test_the_session_of_a_race_steps_on_either_replica(replicas: list[Engine]) -> None:
    # The loser's client goes on with the session its id names: the winner's, called back.
    a, b = replicas
    for round_ in range(3):
        session_id = f"stepped-{round_}"
        pair = (a, b) if round_ % 2 else (b, a)
        outcomes = await _race(_open(pair[0], session_id), _open(pair[1], session_id))
        winner, _, loser = _winner_and_loser(pair, outcomes)
        assert await _step(loser, session_id) == 1  # called back from the winner
        assert loser.store.resident(session_id, OWNER) is not None
        assert winner.store.resident(session_id, OWNER) is None
        assert await _step(winner, session_id) == 2  # and back again
        assert (await loser.get_session(session_id, OWNER)).position == 2


@pytest.mark.parametrize("opener_is", ["the other replica", "the forking replica"])
async def test_a_fork_to_an_id_and_an_open_of_it_at_once_make_it_once(
    replicas: list[Engine], redis_server: RedisServer, opener_is: str
) -> None:
    a, b = replicas
    forker = a
    opener = b if opener_is == "the other replica" else a
    await _open(forker, "source")
    assert await _step(forker, "source") == 1  # a fork starts at 1, an open at 0
    for round_ in range(ROUNDS):
        session_id = f"fork-{round_}"
        fork = forker.fork_session("source", session_id, OWNER)
        calls: tuple[Awaitable[SessionInfo], Awaitable[SessionInfo]]
        calls = (fork, _open(opener, session_id))
        pair = (forker, opener)
        if round_ % 2:
            calls, pair = (calls[1], calls[0]), (opener, forker)
        outcomes = await _race(*calls)
        won, info = _one_succeeded(outcomes)
        assert info.position == (1 if calls[won] is fork else 0)
        if forker is not opener:
            await _held_by_winner_only(redis_server, pair[won], pair[1 - won], session_id)
        held = sum(engine.store.is_resident(session_id, OWNER) for engine in replicas)
        assert held == 1
    assert forker.store.resident("source", OWNER) is not None  # the source is untouched
    assert (await forker.get_session("source", OWNER)).position == 1


async def test_an_open_refused_after_its_claim_leaves_the_id_free(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # The id was claimed, then the open failed on this replica (here: the identity's quota):
    # the claim must go with it, or the id would stay taken with no session behind it.
    config = EngineConfig(reap_interval_s=3600, max_sessions_per_identity=1)
    async with _replicas(tmp_path, redis_server, config) as (a, b):
        await _open(a, "first")
        with pytest.raises(RnnserveError) as refused:
            await _open(a, "second")
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert a.state_store is not None
        assert await a.state_store.holder("second", OWNER) is None
        assert (await _open(b, "second")).position == 0
        assert _open_sessions(a) == 1


async def test_a_replica_counts_as_running_once_its_start_returns(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Until a replica listens for release requests the others take it for gone and would claim
    # the ids it holds (those it restored at start among them): start waits for the listener.
    repo = build_test_repository(tmp_path / "repo", {"max_queue_delay_us": 0})
    prefix = f"open-race{next(_prefixes)}:"
    async with engines_sharing(repo, redis_server.url, prefix) as (a, b):
        for asker, holder in ((a, b), (b, a)):
            assert asker.state_store is not None
            assert await asker.state_store.holder_alive(holder.residency.replica_id)  # type: ignore[attr-defined]


async def test_a_replica_whose_store_is_down_at_start_starts_and_serves(tmp_path: Path) -> None:
    # The wait for the listener ends once its first subscription fails: no store, no wait.
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    repo = build_test_repository(tmp_path / "repo", {"max_queue_delay_us": 0})
    store = RedisStateStore(f"redis://127.0.0.1:{port}/0", "down:")
    engine = Engine(load_repository(repo), Metrics(), EngineConfig(reap_interval_s=3600), store)
    try:
        await engine.start()
        sid = (await engine.open_session(MODEL, "", "", {}, 0, OWNER)).session_id
        sink = Collector()
        engine.submit([(0, sid, {"x": np.ones((1, 4), np.float32)}, None, None)], OWNER, sink)
        (outcome,) = await sink.wait_for(1)
        assert outcome.error is None and outcome.position == 1
    finally:
        await engine.stop()
        await store.close()
