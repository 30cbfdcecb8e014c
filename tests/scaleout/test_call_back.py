"""Sessions follow the load balancer's ring: a replica asked for a session that another replica
holds calls it back (the holder parks it in Redis on request) instead of answering "not
found". This is what a rolling restart needs once the restarted replica rejoins the ring, and
what adding a replica needs: the ring moves sessions to a replica that never had them.

Real ``rnnserve serve`` processes share a real ``redis-server``; every step of a session that
moves between them must give exactly the outputs of a session that never moved (a server
without a store), with its position counting on.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from deploy.tools import http_get, wait_until
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import inputs, open_session, output, step

_prefixes = itertools.count()


def _store_args(redis_server: RedisServer) -> tuple[str, ...]:
    return (
        "--state-store",
        redis_server.url,
        "--state-store-prefix",
        f"callback{next(_prefixes)}:",
    )


def _reference(repository: Path, session_id: str, xs: list[np.ndarray]) -> list[np.ndarray]:
    with ServerProcess(repository) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        open_session(stub, session_id)
        return [output(step(stub, session_id, x)) for x in xs]


def _call_backs(server: ServerProcess) -> dict[str, float]:
    """rnnserve_session_call_backs_total by outcome."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(server.metrics_url)
    assert status == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "rnnserve_session_call_backs_total":
                found[sample.labels["outcome"]] = sample.value
    return found


@contextmanager
def _stub(server: ServerProcess) -> Iterator[pb_grpc.InferenceServiceStub]:
    """A stub on ``server`` for the block; its channel closed after."""
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def test_a_session_follows_its_replica_back_after_a_rolling_restart(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    """Open on A; A drains (hands off); B takes it; A' starts; the session steps on A', then
    on B again: six steps across three processes, outputs exact, positions 1..6."""
    args = _store_args(redis_server)
    session_id = "rejoin-0"
    xs = inputs(seed=7, steps=6)
    want = _reference(scaleout_repository, session_id, xs)
    got, positions = [], []
    with ServerProcess(scaleout_repository, *args) as b, _stub(b) as on_b:
        with ServerProcess(scaleout_repository, *args) as a, _stub(a) as on_a:
            open_session(on_a, session_id)
            for x in xs[:2]:
                reply = step(on_a, session_id, x)
                got.append(output(reply))
                positions.append(reply.position)
        # A drained: its session went to Redis; B takes it on its next call.
        reply = step(on_b, session_id, xs[2])
        got.append(output(reply))
        positions.append(reply.position)
        with ServerProcess(scaleout_repository, *args) as a_again, _stub(a_again) as on_a_again:
            # The ring sends the session back to A: it is resident on B, not parked.
            for x in xs[3:5]:
                reply = step(on_a_again, session_id, x)
                got.append(output(reply))
                positions.append(reply.position)
            # ... and B is asked again.
            reply = step(on_b, session_id, xs[5])
            got.append(output(reply))
            positions.append(reply.position)
            released = _call_backs(a_again)
    assert positions == [1, 2, 3, 4, 5, 6]
    for have, expected in zip(got, want, strict=True):
        assert np.array_equal(have, expected)
    assert released.get("released") == 1


def test_a_replica_added_to_the_ring_takes_the_sessions_it_is_given(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    """Sessions opened on A, then stepped on a new replica C (scale-out), then on A: each
    step exact, and C never answers "not found" for a session A holds."""
    args = _store_args(redis_server)
    ids = [f"added-{n}" for n in range(5)]
    xs = inputs(seed=11, steps=3)
    want = _reference(scaleout_repository, "ref", xs)
    with (
        ServerProcess(scaleout_repository, *args) as a,
        ServerProcess(scaleout_repository, *args) as c,
        _stub(a) as on_a,
        _stub(c) as on_c,
    ):
        for session_id in ids:
            open_session(on_a, session_id)
            assert np.array_equal(output(step(on_a, session_id, xs[0])), want[0])
        for session_id in ids:
            reply = step(on_c, session_id, xs[1])
            assert reply.position == 2
            assert np.array_equal(output(reply), want[1])
        for session_id in ids:
            reply = step(on_a, session_id, xs[2])
            assert reply.position == 3
            assert np.array_equal(output(reply), want[2])


def test_a_session_closed_on_its_holder_is_not_found_elsewhere_at_once(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    """The holder, asked for a session it no longer has, drops its record: the asker answers
    NOT_FOUND without waiting out the release, and nothing comes back to life."""
    args = _store_args(redis_server)
    with (
        ServerProcess(scaleout_repository, *args) as a,
        ServerProcess(scaleout_repository, *args) as b,
        _stub(a) as on_a,
        _stub(b) as on_b,
    ):
        open_session(on_a, "closed-0")
        step(on_a, "closed-0", inputs(seed=1, steps=1)[0])
        on_a.CloseSession(pb.CloseSessionRequest(session_id="closed-0"), timeout=10)
        try:
            step(on_b, "closed-0", inputs(seed=1, steps=1)[0])
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("a closed session came back on another replica")
        assert _call_backs(b).get("timeout", 0) == 0


def test_an_id_naming_a_store_record_fails_alone_and_the_store_stays_up(
    small_repository: Path, redis_server: RedisServer
) -> None:
    """A session id cannot reach the store's own records (``X#holder`` is no session id): the
    call is NOT_FOUND and every other caller's parked session comes back as usual."""
    args = (*_store_args(redis_server), "--park-after-s", "0.2")
    with ServerProcess(small_repository, *args) as server, _stub(server) as stub:
        open_session(stub, "parked-0")
        step(stub, "parked-0", inputs(seed=2, steps=1)[0])
        prefix = args[args.index("--state-store-prefix") + 1]
        client = redis_server.client()
        wait_until("parked-0 to park", lambda: client.exists(prefix + "anonymous/parked-0"))
        open_session(stub, "X")
        for bad in ("X#holder", "X#moving", "X" * 200):
            try:
                step(stub, bad, inputs(seed=3, steps=1)[0])
            except grpc.RpcError as error:
                assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
            else:
                raise AssertionError(f"{bad!r} was served")
        try:
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", session_id="X#holder"))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        else:
            raise AssertionError("a session id with '#' was accepted")
        assert step(stub, "parked-0", inputs(seed=2, steps=2)[1]).position == 2


def test_an_id_held_by_another_running_replica_cannot_be_opened_twice(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    """One (owner, id) is one session across replicas: opening it on B while A holds it is
    ALREADY_EXISTS, and A's session goes on untouched."""
    args = _store_args(redis_server)
    with (
        ServerProcess(scaleout_repository, *args) as a,
        ServerProcess(scaleout_repository, *args) as b,
        _stub(a) as on_a,
        _stub(b) as on_b,
    ):
        open_session(on_a, "once")
        step(on_a, "once", inputs(seed=4, steps=1)[0])
        try:
            open_session(on_b, "once")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.ALREADY_EXISTS
        else:
            raise AssertionError("opened twice")
        assert step(on_a, "once", inputs(seed=4, steps=2)[1]).position == 2


def test_a_handed_off_sessions_holder_record_lives_no_longer_than_its_parked_state(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    args = _store_args(redis_server)
    prefix = args[args.index("--state-store-prefix") + 1]
    with ServerProcess(scaleout_repository, *args) as a, _stub(a) as on_a:
        open_session(on_a, "ttl-0")
    client = redis_server.client()
    parked_ttl = client.pttl(prefix + "anonymous/ttl-0")
    holder_ttl = client.pttl(prefix + "anonymous/ttl-0#holder")
    assert 0 < parked_ttl and 0 < holder_ttl <= parked_ttl + 1000


def test_a_session_released_to_another_replica_is_not_taken_for_expired_by_the_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A releases S to B; long after S's idle timeout on A's clock, S (active on B) is called
    back to A, not answered "expired"."""
    from rnnserve.testing import build_test_repository

    repository = build_test_repository(tmp_path / "short", {"idle_timeout_s": 1.5})
    args = (*_store_args(redis_server), "--park-after-s", "100")
    xs = inputs(seed=9, steps=8)
    with (
        ServerProcess(repository, *args) as a,
        ServerProcess(repository, *args) as b,
        _stub(a) as on_a,
        _stub(b) as on_b,
    ):
        open_session(on_a, "S")
        step(on_a, "S", xs[0])
        for x in xs[1:6]:  # kept busy on B past A's idle timeout for S
            step(on_b, "S", x)
            time.sleep(0.5)
        assert step(on_a, "S", xs[6]).position == 7


async def test_a_session_on_its_way_back_when_the_server_stops_is_handed_off_not_lost(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A stop that begins while a parked session is being taken back waits for the move,
    then hands the session off: it is in the store afterwards, at its position."""
    import asyncio

    from rnnserve.server.engine.core import Engine
    from rnnserve.server.engine.state_store import RedisStateStore
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import load_repository
    from rnnserve.testing import build_test_repository

    class SlowNetwork(RedisStateStore):
        """The real store on the real Redis, with a slow link for takes: the stop below then
        surely begins while a take is on its way."""

        async def take(
            self, session_id: str, owner: str, token: str, taker: str, *, again: bool = False
        ) -> bytes | None:
            await asyncio.sleep(0.3)
            return await super().take(session_id, owner, token, taker, again=again)

    prefix = f"callback{next(_prefixes)}:"
    root = build_test_repository(tmp_path / "repo", {"max_sessions": 8})

    async def engine() -> Engine:
        built = Engine(
            load_repository(root), Metrics(), None, SlowNetwork(redis_server.url, prefix)
        )
        await built.start()
        return built

    first = await engine()
    await first.open_session("tiny_lstm", "1", "coming-back", {}, 5, "alice")
    await first.stop()  # handed off to the store
    assert first.state_store is not None
    await first.state_store.close()

    second = await engine()
    try:
        returning = asyncio.ensure_future(second.get_session("coming-back", "alice"))
        await asyncio.sleep(0.1)  # the take is on its way; the stop starts now
    finally:
        await second.stop()
        assert second.state_store is not None
        await second.state_store.close()
    await asyncio.gather(returning, return_exceptions=True)
    client = redis_server.client()
    assert client.exists(prefix + "alice/coming-back"), "lost: taken back, then not handed off"

    third = await engine()
    try:
        info = await third.get_session("coming-back", "alice")
        assert info.position == 5
    finally:
        await third.stop()
        assert third.state_store is not None
        await third.state_store.close()
