"""Session operations: export/import, fork, safe retry, reset, close — checked by outputs."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rnnserve.server.frontend.tensors import to_array
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import assert_close, outputs_of, reason_of, reference, step, stub_for

MODEL = "tiny_lstm"


@pytest.fixture
def stub(server: ServerProcess):  # noqa: ANN201
    with stub_for(server.address) as s:
        yield s


def _x(seed: int, t: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, 4)).astype(np.float32)


def _open(stub, **kw) -> str:  # noqa: ANN001
    return stub.OpenSession(pb.OpenSessionRequest(model=MODEL, **kw)).session.session_id


def test_export_then_open_continues_where_the_original_would(stub, test_repository) -> None:  # noqa: ANN001
    x = _x(1)
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    sid = _open(stub)
    step(stub, sid, "x", x[:5])
    exported = stub.ExportState(pb.ExportStateRequest(session_id=sid))
    assert exported.session.position == 5
    assert set(exported.state) == {"initial_h", "initial_c"}
    moved = stub.OpenSession(
        pb.OpenSessionRequest(
            model=MODEL, initial_state=exported.state, initial_position=exported.session.position
        )
    ).session
    assert moved.position == 5
    rest_original = outputs_of(step(stub, sid, "x", x[5:]))
    reply = step(stub, moved.session_id, "x", x[5:])
    assert reply.position == 8
    want = reference(test_repository, model, x)
    assert_close(outputs_of(reply), {"Y": want["Y"][5:]})
    assert_close(rest_original, {"Y": want["Y"][5:]})


def test_fork_gives_two_independent_continuations(stub, test_repository) -> None:  # noqa: ANN001
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    prefix, a, b = _x(2, 4), _x(3, 3), _x(4, 3)
    sid = _open(stub)
    step(stub, sid, "x", prefix)
    fork = stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id="fork-1"))
    assert fork.session.session_id == "fork-1"
    assert fork.session.position == 4
    got_a = outputs_of(step(stub, sid, "x", a))
    got_b = outputs_of(step(stub, "fork-1", "x", b))
    assert_close(
        got_a, {"Y": reference(test_repository, model, np.concatenate([prefix, a]))["Y"][4:]}
    )
    assert_close(
        got_b, {"Y": reference(test_repository, model, np.concatenate([prefix, b]))["Y"][4:]}
    )
    stub.CloseSession(pb.CloseSessionRequest(session_id="fork-1"))


def test_retried_step_returns_the_stored_reply_and_advances_nothing(stub, test_repository) -> None:  # noqa: ANN001
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    x = _x(5, 6)
    sid = _open(stub)
    first = step(stub, sid, "x", x[:2], expected_position=0)
    again = step(stub, sid, "x", x[:2], expected_position=0)
    assert again == first
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position == 2
    for bad_position, inputs in ((0, x[2:4]), (1, x[:2]), (7, x[2:4])):
        with pytest.raises(grpc.RpcError) as info:
            step(stub, sid, "x", inputs, expected_position=bad_position)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(info.value) == "POSITION_MISMATCH"
    rest = step(stub, sid, "x", x[2:], expected_position=2)
    assert rest.position == 6
    assert_close(outputs_of(rest), {"Y": reference(test_repository, model, x)["Y"][2:]})


def test_reset_starts_over_from_zeros(stub, test_repository) -> None:  # noqa: ANN001
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    x = _x(6, 3)
    sid = _open(stub)
    step(stub, sid, "x", _x(7, 5))
    reset = stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    assert reset.session.position == 0
    assert_close(outputs_of(step(stub, sid, "x", x)), reference(test_repository, model, x))


def test_closed_session_says_closed_and_slot_reuse_leaks_nothing(stub, test_repository) -> None:  # noqa: ANN001
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    sid = _open(stub, session_id="to-close")
    step(stub, sid, "x", _x(8, 5))
    stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    for call in (
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid)),
        lambda: step(stub, sid, "x", _x(8, 1)),
        lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=sid)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert reason_of(info.value) == "SESSION_CLOSED"
    x = _x(9, 4)
    again = _open(stub, session_id="to-close")
    assert_close(outputs_of(step(stub, again, "x", x)), reference(test_repository, model, x))
    exported = stub.ExportState(pb.ExportStateRequest(session_id=again))
    want = reference(test_repository, model, x)
    assert_close({k: to_array(v, k) for k, v in exported.state.items()}, want)
