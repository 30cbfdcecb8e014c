"""MoveSession of sessions that are not resident where it is called, and retiring versions
with parked sessions.

- A session parked in Redis (by this replica or by another), or held resident by another
  replica, is brought here the way a step brings it (taken, or called back), then moved: the
  reply is that of moving a resident session (id, owner and position kept), and every output
  afterwards is that of a session opened on the target version with the state exported
  before the move. Its errors are those of a resident session's move (STATE_INCOMPATIBLE,
  SESSION_BUSY, NOT_FOUND for a session that does not exist), plus UNAVAILABLE
  ``STATE_STORE_UNAVAILABLE`` (retry) while the store is down, its state kept.
- A retiring version waits for the sessions this replica parked to come back to it, as it
  waits for resident ones: their clients come back to the version they opened, and an
  operator can move them off it. It is released once they are moved, ended, expired in the
  store or taken up by another replica.
- A session parked on a version already released here (parked by another replica) answers
  FAILED_PRECONDITION ``VERSION_NOT_FOUND`` saying that its version was retired and released,
  is left in the store, and can still be moved onto a version with the same state pairs.

Real engines in this process, parking into a real ``redis-server``; two engines sharing a
prefix are two replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from deploy.tools import free_port
from rnnserve.server import errors
from rnnserve.server.app import session_listener
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.lifecycle import VersionStatus
from rnnserve.server.engine.state_store import RedisStateStore
from rnnserve.server.errors import RnnserveError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import HIDDEN, build_test_repository, cell_model, run_reference
from server.helpers import Collector, slow_runs

from .redis_server import RedisServer

OWNER = "alice"
MODEL = "tiny_lstm"
_prefixes = itertools.count()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The test models (tiny_lstm at versions 1 and 2: same state pairs, other weights)."""
    return build_test_repository(tmp_path / "repo", {"max_sessions": 16})


def _x(seed: int, timesteps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


def _prefix() -> str:
    return f"move-parked{next(_prefixes)}:"


@asynccontextmanager
async def _replica(
    repo: Path,
    url: str,
    prefix: str,
    *,
    park_after_s: float | None = 0.2,
    owners: frozenset[str] | None = None,
) -> AsyncIterator[Engine]:
    """An engine parking into ``url`` under ``prefix`` (idle sessions after ``park_after_s``),
    whose sessions may be owned by ``owners`` (None: any identity), started for the block
    and stopped after."""
    metrics = Metrics()
    engine = Engine(
        load_repository(repo),
        metrics,
        EngineConfig(park_after_s=park_after_s, reap_interval_s=0.05, owners=owners),
        RedisStateStore(url, prefix),
        session_listener(metrics),
    )
    await engine.start()
    try:
        yield engine
    finally:
        try:
            await engine.stop()
        finally:
            assert engine.state_store is not None
            await engine.state_store.close()


async def _step(engine: Engine, sid: str, x: np.ndarray, owner: str = OWNER) -> np.ndarray:
    """``Y`` of one step of ``sid``; raises its error."""
    sink = Collector()
    engine.submit([(0, sid, {"x": x}, None, None)], owner, sink)
    (outcome,) = await sink.wait_for(1)
    if outcome.error is not None:
        raise outcome.error
    assert outcome.outputs is not None
    return outcome.outputs["Y"][outcome.row]


async def _parked(redis_server: RedisServer, prefix: str, sid: str, owner: str = OWNER) -> None:
    """Wait until ``sid`` is parked in the store."""
    client = redis_server.client()
    deadline = time.monotonic() + 10
    while not client.exists(f"{prefix}{owner}/{sid}"):
        assert time.monotonic() < deadline, f"{sid} was never parked"
        await asyncio.sleep(0.02)


async def _parked_here(engine: Engine, count: int) -> None:
    """Wait until ``engine`` knows of ``count`` sessions of version 1 that it parked (the
    store's reply to the park read, not only the record written)."""
    labels = {"model": MODEL, "version": "1"}
    deadline = time.monotonic() + 10
    while engine.metrics.registry.get_sample_value("rnnserve_parked_sessions", labels) != count:
        assert time.monotonic() < deadline, f"{count} sessions were never parked"
        await asyncio.sleep(0.02)


async def _version(engine: Engine, version: str) -> VersionStatus:
    (found,) = [
        s for s in await engine.repository_index() if (s.model, s.version) == (MODEL, version)
    ]
    return found


async def _becomes(engine: Engine, version: str, state: str) -> VersionStatus:
    deadline = time.monotonic() + 10
    while (found := await _version(engine, version)).state != state:
        assert time.monotonic() < deadline, f"{MODEL}:{version} never became {state}: {found}"
        await asyncio.sleep(0.02)
    return found


def _assert_continues(
    repo: Path, got: np.ndarray, x: np.ndarray, state: dict[str, np.ndarray]
) -> None:
    """``got`` is what version 2 answers for ``x`` from ``state`` (a session opened on it
    with the state exported before the move)."""
    want = run_reference(repo, MODEL, "2", {"x": x}, initial_state=state)["Y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


async def test_a_session_parked_here_is_brought_back_and_moved(
    repo: Path, redis_server: RedisServer
) -> None:
    prefix = _prefix()
    # This server's one identity: the session is found by its id alone, as a resident one is.
    async with _replica(repo, redis_server.url, prefix, owners=frozenset({OWNER})) as engine:
        await engine.open_session(MODEL, "1", "s", {}, 0, OWNER)
        x = _x(1, 5)
        await _step(engine, "s", x[:3])
        state = (await engine.export_state("s", OWNER))[1]
        await _parked(redis_server, prefix, "s")
        assert not engine.store.is_resident("s", OWNER)

        moved = await engine.move_session("s", "", "2")

        assert (moved.session_id, moved.version, moved.position) == ("s", "2", 3)
        assert (await engine.get_session("s", OWNER)).version == "2"  # the owner's, still
        _assert_continues(repo, await _step(engine, "s", x[3:]), x[3:], state)


async def test_a_session_parked_or_held_by_another_replica_is_brought_here_and_moved(
    repo: Path, redis_server: RedisServer
) -> None:
    prefix = _prefix()
    x = _x(2, 4)
    async with (
        _replica(repo, redis_server.url, prefix, park_after_s=None) as a,
        _replica(repo, redis_server.url, prefix, park_after_s=None) as b,
    ):
        states = {}
        for sid in ("parked", "held"):
            await a.open_session(MODEL, "1", sid, {}, 0, OWNER)
            await _step(a, sid, x[:2])
            states[sid] = (await a.export_state(sid, OWNER))[1]
            if sid == "parked":
                assert await a.residency.park_all() == 1  # handed off, as by a drain
        assert a.store.is_resident("held", OWNER)

        for sid in ("parked", "held"):  # taken from the store; called back from A
            moved = await b.move_session(sid, OWNER, "2")
            assert (moved.session_id, moved.version, moved.position) == (sid, "2", 2)
            assert b.store.is_resident(sid, OWNER) and not a.store.is_resident(sid, OWNER)
            _assert_continues(repo, await _step(b, sid, x[2:]), x[2:], states[sid])


async def test_moving_a_parked_session_while_the_store_is_down_answers_retry_and_keeps_it(
    repo: Path, tmp_path: Path
) -> None:
    store = RedisServer(tmp_path / "redis", free_port()).start()
    prefix = _prefix()
    try:
        async with _replica(repo, store.url, prefix) as engine:
            await engine.open_session(MODEL, "1", "s", {}, 0, OWNER)
            x = _x(3, 4)
            await _step(engine, "s", x[:2])
            state = (await engine.export_state("s", OWNER))[1]
            await _parked(store, prefix, "s")
            store.client().save()  # what survives the crash below
            store.kill()

            with pytest.raises(RnnserveError) as down:
                await engine.move_session("s", OWNER, "2")
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert down.value.reason == errors.STATE_STORE_UNAVAILABLE
            assert down.value.retry_after_s  # retry, with RetryInfo
            assert not engine.store.is_resident("s", OWNER)

            store.start()  # same port and folder: the saved session is back
            deadline = time.monotonic() + 10
            while True:  # the store is asked again after its short pause
                try:
                    moved = await engine.move_session("s", OWNER, "2")
                    break
                except RnnserveError as exc:
                    assert exc.reason == errors.STATE_STORE_UNAVAILABLE, exc
                    assert time.monotonic() < deadline
                    await asyncio.sleep(exc.retry_after_s or 0.1)
            assert (moved.version, moved.position) == ("2", 2)
            _assert_continues(repo, await _step(engine, "s", x[2:]), x[2:], state)
    finally:
        store.stop()


async def test_moving_a_parked_session_keeps_the_errors_of_moving_a_resident_one(
    repo: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = _prefix()
    async with _replica(repo, redis_server.url, prefix) as engine:
        await engine.open_session(MODEL, "1", "s", {}, 0, OWNER)
        await _parked(redis_server, prefix, "s")

        # Its id alone does not say whose it is: several identities (or any) may own it.
        with pytest.raises(RnnserveError) as unnamed:
            await engine.move_session("s", "", "2")
        assert (unnamed.value.code, unnamed.value.field) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "owner",
        )
        # A session that does not exist, here or in the store.
        with pytest.raises(RnnserveError) as missing:
            await engine.move_session("nobody", OWNER, "2")
        assert (missing.value.code, missing.value.reason) == (
            grpc.StatusCode.NOT_FOUND,
            errors.SESSION_NOT_FOUND,
        )

        # A step on its way: it brings the session back and runs on version 1 first.
        slow_runs(monkeypatch, engine, f"{MODEL}:1", 0.3)
        sink = Collector()
        engine.submit([(0, "s", {"x": _x(4, 1)}, None, None)], OWNER, sink)
        with pytest.raises(RnnserveError) as busy:
            await engine.move_session("s", OWNER, "2")
        assert busy.value.reason == errors.SESSION_BUSY
        (outcome,) = await sink.wait_for(1)
        assert outcome.error is None and outcome.model == f"{MODEL}:1"
        assert (await engine.move_session("s", OWNER, "2")).version == "2"


async def test_a_retiring_version_waits_for_its_parked_sessions_until_they_are_moved(
    repo: Path, redis_server: RedisServer
) -> None:
    prefix = _prefix()
    x = _x(5, 4)
    async with _replica(repo, redis_server.url, prefix) as engine:
        for sid in ("back", "away"):
            await engine.open_session(MODEL, "1", sid, {}, 0, OWNER)
            await _step(engine, sid, x[:2])
            await _parked(redis_server, prefix, sid)
        state = (await engine.export_state("away", OWNER))[1]
        await _parked_here(engine, 2)  # "away" parked again after the export

        retiring = await engine.retire_model(MODEL, "1", "ops")
        assert (retiring.state, retiring.live_sessions) == ("RETIRING", 2)

        # Its client comes back to the version it opened, and goes on exactly.
        got = await _step(engine, "back", x[2:])
        assert (await engine.get_session("back", OWNER)).version == "1"
        want = run_reference(repo, MODEL, "1", {"x": x})["Y"][2:]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

        # The operator empties it: one resident session and one still parked.
        await _parked_here(engine, 2)
        assert (await _version(engine, "1")).live_sessions == 2
        for sid in ("back", "away"):
            assert (await engine.move_session(sid, OWNER, "2")).version == "2"
        await _becomes(engine, "1", "RETIRED")
        _assert_continues(repo, await _step(engine, "away", x[2:]), x[2:], state)


async def test_a_retiring_version_is_released_once_its_parked_sessions_expire_or_leave(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = build_test_repository(tmp_path / "repo", {"max_sessions": 16, "idle_timeout_s": 3})
    prefix = _prefix()
    async with (
        _replica(repo, redis_server.url, prefix) as a,
        _replica(repo, redis_server.url, prefix) as b,
    ):
        for sid in ("expires", "leaves"):
            await a.open_session(MODEL, "1", sid, {}, 0, OWNER)
        await _parked_here(a, 2)
        assert (await a.retire_model(MODEL, "1", "ops")).live_sessions == 2
        await _step(b, "leaves", _x(6, 1))  # taken up by replica B: no longer A's to wait for
        deadline = time.monotonic() + 5
        while (await _version(a, "1")).live_sessions != 1:
            assert time.monotonic() < deadline, await _version(a, "1")
            await asyncio.sleep(0.02)
        assert (await _version(a, "1")).state == "RETIRING"
        await _becomes(a, "1", "RETIRED")  # "expires" ran out its idle timeout in the store


async def test_a_session_parked_on_a_version_released_here_says_so_and_can_still_be_moved(
    repo: Path, redis_server: RedisServer
) -> None:
    prefix = _prefix()
    x = _x(7, 4)
    async with (
        _replica(repo, redis_server.url, prefix) as a,
        _replica(repo, redis_server.url, prefix) as b,
    ):
        # Parked by replica B; replica A retires version 1, which has no session there.
        await b.open_session(MODEL, "1", "s", {}, 0, OWNER)
        await _step(b, "s", x[:2])
        state = (await b.export_state("s", OWNER))[1]
        await _parked(redis_server, prefix, "s")
        assert (await a.retire_model(MODEL, "1", "ops")).state == "RETIRED"

        for call in (lambda: _step(a, "s", x[2:]), lambda: a.get_session("s", OWNER)):
            with pytest.raises(RnnserveError) as released:
                await call()
            assert released.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert released.value.reason == errors.VERSION_NOT_FOUND
            assert "tiny_lstm:1, which was retired and released" in released.value.message
            assert "MoveSession" in released.value.message
        assert redis_server.client().exists(f"{prefix}{OWNER}/s")  # its state is kept

        # Version 3 declares a wider state: the move is refused, and nothing is taken.
        config = repo / MODEL / "config.toml"
        hidden = HIDDEN[MODEL]
        config.write_text(config.read_text().replace(f", {hidden}]", f", {hidden + 2}]"))
        (repo / MODEL / "3").mkdir()
        (repo / MODEL / "3" / "model.onnx").write_bytes(cell_model("LSTM", hidden + 2, 5, {}))
        (loaded,) = await a.load_model(MODEL, "3")
        assert loaded.state == "READY", loaded.reason
        with pytest.raises(RnnserveError) as refused:
            await a.move_session("s", OWNER, "3")
        assert refused.value.reason == errors.STATE_INCOMPATIBLE
        assert redis_server.client().exists(f"{prefix}{OWNER}/s")

        moved = await a.move_session("s", OWNER, "2")
        assert (moved.session_id, moved.version, moved.position) == ("s", "2", 2)
        _assert_continues(repo, await _step(a, "s", x[2:]), x[2:], state)
