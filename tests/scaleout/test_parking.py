"""Parking sessions in a real Redis: idle or crowded-out sessions leave their slab slot and
come back on their next call, with outputs identical to sessions that never left.

Every server here is a real ``rnnserve serve`` process with ``--state-store`` pointing at a
real ``redis-server``; the reference is a server without a store (and onnxruntime itself).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
import pytest
from deploy.stubs import to_tensor
from deploy.tools import metric_totals, wait_until
from rnnserve.testing import ServerProcess, run_reference
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import MODEL, TIMEOUT_S, code_of, inputs, open_session, output, run_steps, step

PARK_AFTER_S = "0.3"
_prefixes = itertools.count()


def _store_args(redis_server: RedisServer, *more: str) -> tuple[str, ...]:
    """Flags of a server parking in ``redis_server`` under a key prefix of its own."""
    prefix = f"test{next(_prefixes)}:"
    return ("--state-store", redis_server.url, "--state-store-prefix", prefix, *more)


def _prefix(args: tuple[str, ...]) -> str:
    return args[args.index("--state-store-prefix") + 1]


def _parked(redis_server: RedisServer, prefix: str, session_id: str) -> bool:
    return bool(redis_server.client().exists(prefix + "anonymous/" + session_id))


@pytest.fixture(scope="module")
def reference(scaleout_repository: Path) -> Iterator[pb_grpc.InferenceServiceStub]:
    """A server without a state store: its sessions never leave their slots."""
    with ServerProcess(scaleout_repository) as server, grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.InferenceServiceStub(ch)


class Parker(NamedTuple):
    stub: pb_grpc.InferenceServiceStub
    prefix: str
    server: ServerProcess


@pytest.fixture(scope="module")
def idle_parker(scaleout_repository: Path, redis_server: RedisServer) -> Iterator[Parker]:
    """A server parking sessions idle for 0.3 s."""
    args = _store_args(redis_server, "--park-after-s", PARK_AFTER_S)
    with (
        ServerProcess(scaleout_repository, *args) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        yield Parker(pb_grpc.InferenceServiceStub(ch), _prefix(args), server)


def test_parked_session_steps_exactly_like_one_never_parked(
    idle_parker: Parker,
    reference: pb_grpc.InferenceServiceStub,
    redis_server: RedisServer,
    scaleout_repository: Path,
) -> None:
    stub, prefix, _ = idle_parker
    xs = inputs(seed=1, steps=6)
    open_session(stub, "idle-a")
    open_session(reference, "idle-a")
    before = run_steps(stub, "idle-a", xs[:3])
    wait_until("the idle session to be parked", lambda: _parked(redis_server, prefix, "idle-a"))
    after = run_steps(stub, "idle-a", xs[3:])
    # Taken out of the store on its first call back: the key is gone at once.
    assert not _parked(redis_server, prefix, "idle-a")

    expected = run_steps(reference, "idle-a", xs)
    for got, want in zip(before + after, expected, strict=True):
        np.testing.assert_array_equal(got, want)  # bit for bit
    whole = run_reference(scaleout_repository, MODEL, "", {"x": np.concatenate(xs)})
    np.testing.assert_allclose(np.concatenate(before + after), whole["Y"], rtol=1e-5, atol=1e-6)

    session = stub.GetSession(pb.GetSessionRequest(session_id="idle-a"), timeout=TIMEOUT_S).session
    assert session.position == 6


def test_retry_of_the_last_step_is_answered_from_the_parked_reply(
    idle_parker: Parker, redis_server: RedisServer
) -> None:
    stub, prefix, _ = idle_parker
    xs = inputs(seed=2, steps=2)
    open_session(stub, "retry-a")
    step(stub, "retry-a", xs[0], expected_position=0)
    first = step(stub, "retry-a", xs[1], expected_position=1)
    wait_until("the session to be parked", lambda: _parked(redis_server, prefix, "retry-a"))
    # The reply of position 1 -> 2 was lost; the retry is answered, not applied again.
    again = step(stub, "retry-a", xs[1], expected_position=1)
    assert again == first
    assert again.position == 2


def test_export_fork_and_close_of_parked_sessions(
    idle_parker: Parker,
    reference: pb_grpc.InferenceServiceStub,
    redis_server: RedisServer,
) -> None:
    stub, prefix, _ = idle_parker
    xs = inputs(seed=3, steps=4)
    for target in (stub, reference):
        open_session(target, "efc")
        run_steps(target, "efc", xs[:2])
    wait_until("the session to be parked", lambda: _parked(redis_server, prefix, "efc"))

    exported = stub.ExportState(pb.ExportStateRequest(session_id="efc"), timeout=TIMEOUT_S)
    wanted = reference.ExportState(pb.ExportStateRequest(session_id="efc"), timeout=TIMEOUT_S)
    assert exported.session.position == 2
    assert dict(exported.state) == dict(wanted.state)  # the same bytes

    wait_until("the session to be parked again", lambda: _parked(redis_server, prefix, "efc"))
    stub.ForkSession(
        pb.ForkSessionRequest(session_id="efc", new_session_id="efc-fork"), timeout=TIMEOUT_S
    )
    reference.ForkSession(
        pb.ForkSessionRequest(session_id="efc", new_session_id="efc-fork"), timeout=TIMEOUT_S
    )
    for session_id in ("efc", "efc-fork"):
        got = run_steps(stub, session_id, xs[2:])
        want = run_steps(reference, session_id, xs[2:])
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)

    wait_until("the session to be parked again", lambda: _parked(redis_server, prefix, "efc"))
    stub.CloseSession(pb.CloseSessionRequest(session_id="efc"), timeout=TIMEOUT_S)
    assert not _parked(redis_server, prefix, "efc")
    code = code_of(
        stub.Step, pb.StepRequest(session_id="efc", inputs={"x": to_tensor(xs[0])}), "efc"
    )
    assert code == grpc.StatusCode.NOT_FOUND


def test_an_id_parked_is_still_taken(idle_parker: Parker, redis_server: RedisServer) -> None:
    stub, prefix, _ = idle_parker
    open_session(stub, "taken")
    wait_until("the session to be parked", lambda: _parked(redis_server, prefix, "taken"))
    request = pb.OpenSessionRequest(model=MODEL, session_id="taken")
    assert code_of(stub.OpenSession, request, "taken") == grpc.StatusCode.ALREADY_EXISTS
    assert _parked(redis_server, prefix, "taken")  # and left where it was


def test_ten_times_more_sessions_than_slots_all_step_correctly(
    small_repository: Path, redis_server: RedisServer
) -> None:
    """4 slots, 40 sessions stepped round-robin: every step parks one session, unparks one."""
    sessions, rounds = 40, 4
    args = _store_args(redis_server)
    xs = {f"crowd-{i}": inputs(seed=100 + i, steps=rounds) for i in range(sessions)}
    with (
        ServerProcess(small_repository, *args) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        for session_id in xs:
            open_session(stub, session_id)
        outputs: dict[str, list[np.ndarray]] = {session_id: [] for session_id in xs}
        for r in range(rounds):
            # Half by unary Step, half in one StreamSteps call per round (several per message).
            unary = list(xs)[: sessions // 2]
            for session_id in unary:
                reply = step(stub, session_id, xs[session_id][r], expected_position=r)
                assert reply.position == r + 1
                outputs[session_id].append(output(reply))
            streamed = list(xs)[sessions // 2 :]
            messages = [
                pb.StreamStepsRequest(
                    steps=[
                        pb.StepRequest(
                            session_id=session_id,
                            inputs={"x": to_tensor(xs[session_id][r])},
                            expected_position=r,
                        )
                        for session_id in streamed[i : i + 5]
                    ]
                )
                for i in range(0, len(streamed), 5)
            ]
            for message in stub.StreamSteps(iter(messages), timeout=TIMEOUT_S):
                for result in message.results:
                    assert result.WhichOneof("outcome") == "response", result.error
                    assert result.response.position == r + 1
                    outputs[result.session_id].append(output(result.response))
        parked = sum(_parked(redis_server, _prefix(args), s) for s in xs)
        assert parked == sessions - 4  # all but the 4 that fit

    for session_id, chunks in outputs.items():
        whole = run_reference(small_repository, MODEL, "", {"x": np.concatenate(xs[session_id])})
        np.testing.assert_allclose(np.concatenate(chunks), whole["Y"], rtol=1e-5, atol=1e-6)


def test_a_stream_of_many_steps_for_parked_sessions_keeps_each_sessions_order(
    small_repository: Path, redis_server: RedisServer
) -> None:
    """Steps of parked sessions sent back to back on one stream wait for their unpark and
    still run in order; all 12 sessions keep going through 4 slots."""
    args = _store_args(redis_server)
    ids = [f"order-{i}" for i in range(12)]
    xs = {session_id: inputs(seed=200 + i, steps=5) for i, session_id in enumerate(ids)}
    with (
        ServerProcess(small_repository, *args) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        for session_id in ids:
            open_session(stub, session_id)
        messages = [
            pb.StreamStepsRequest(
                steps=[pb.StepRequest(session_id=s, inputs={"x": to_tensor(xs[s][k])}) for s in ids]
            )
            for k in range(5)
        ]
        got: dict[str, list[pb.StepResponse]] = {s: [] for s in ids}
        for message in stub.StreamSteps(iter(messages), timeout=TIMEOUT_S):
            for result in message.results:
                assert result.WhichOneof("outcome") == "response", result.error
                got[result.session_id].append(result.response)
    for session_id in ids:
        assert [r.position for r in got[session_id]] == [1, 2, 3, 4, 5]
        whole = run_reference(small_repository, MODEL, "", {"x": np.concatenate(xs[session_id])})
        outs = np.concatenate([output(r) for r in got[session_id]])
        np.testing.assert_allclose(outs, whole["Y"], rtol=1e-5, atol=1e-6)


def test_bad_flags_are_refused_naming_the_flag(scaleout_repository: Path) -> None:
    for args, flag in (
        (("--park-after-s", "5"), "--park-after-s needs --state-store"),
        (("--state-store", "http://x:1"), "--state-store"),
        (("--state-store", "redis://127.0.0.1:1/0", "--park-after-s", "0"), "--park-after-s"),
    ):
        with pytest.raises(RuntimeError, match=flag), ServerProcess(scaleout_repository, *args):
            pass


def test_metrics_count_parks_and_unparks(idle_parker: Parker, redis_server: RedisServer) -> None:
    stub, prefix, server = idle_parker
    before = metric_totals(server.metrics_url)
    open_session(stub, "metered")
    wait_until("the session to be parked", lambda: _parked(redis_server, prefix, "metered"))
    step(stub, "metered", inputs(seed=4, steps=1)[0])
    after = metric_totals(server.metrics_url)
    assert after["rnnserve_parks_total"] >= before.get("rnnserve_parks_total", 0) + 1
    assert after["rnnserve_unparks_total"] >= before.get("rnnserve_unparks_total", 0) + 1
    assert after["rnnserve_park_seconds_count"] > 0
    assert after["rnnserve_unpark_seconds_count"] > 0
    assert "rnnserve_parked_sessions" in after


def test_a_session_that_expires_while_parked_is_counted_as_ended(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A parked session whose idle timeout runs out in the store ended here (expire), once:
    sessions_ended counts it as it counts one expiring in its slot."""
    from rnnserve.testing import build_test_repository

    repository = build_test_repository(tmp_path / "short", {"idle_timeout_s": 1.5})
    args = _store_args(redis_server, "--park-after-s", PARK_AFTER_S)
    with (
        ServerProcess(repository, *args) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)

        def expired() -> float:
            return server.metric("rnnserve_sessions_ended_total", model=MODEL, reason="expire")

        open_session(stub, "short-lived")
        wait_until(
            "the session to park", lambda: _parked(redis_server, _prefix(args), "short-lived")
        )
        wait_until("the parked session to be counted as expired", expired, timeout_s=15)
        request = pb.GetSessionRequest(session_id="short-lived")
        assert code_of(stub.GetSession, request, "short-lived") == grpc.StatusCode.NOT_FOUND
        assert expired() == 1
        assert server.metric("rnnserve_sessions_ended_total", model=MODEL) == 1
        assert server.metric("rnnserve_parked_sessions", model=MODEL) == 0
