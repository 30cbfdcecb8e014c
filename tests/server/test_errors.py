"""Every error path answers its status code and reason, and no session's state changes."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import tensor_pb2

from .helpers import assert_close, metric, outputs_of, reason_of, reference, step, stub_for

MODEL = "tiny_gru"
SID = "errors-victim"


def _x(t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, 4)).astype(np.float32)


def _tensor(array: np.ndarray, **override) -> tensor_pb2.Tensor:  # noqa: ANN003
    tensor = from_array(array)
    for key, value in override.items():
        if key == "shape":
            del tensor.shape[:]
            tensor.shape.extend(value)
        else:
            setattr(tensor, key, value)
    return tensor


def _bad_step(**tensors) -> Callable:  # noqa: ANN003
    def call(stub) -> None:  # noqa: ANN001
        stub.Step(pb.StepRequest(session_id=SID, inputs=tensors))

    return call


_NAN = _x(1).copy()
_NAN[0, 1] = np.nan
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES: dict[str, tuple[Callable, grpc.StatusCode, str]] = {
    "unknown model": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model="nope")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    ),
    "unknown version": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, version="9")),
        grpc.StatusCode.NOT_FOUND,
        "VERSION_NOT_FOUND",
    ),
    "unknown session": (
        lambda s: step(s, "never-opened", "x", _x(1)),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
    ),
    "session id taken": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=SID)),
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_EXISTS",
    ),
    "bad session id": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="a b/c")),
        INVALID,
        "INVALID_REQUEST",
    ),
    "negative initial position": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, initial_position=-1)),
        INVALID,
        "INVALID_REQUEST",
    ),
    "initial position past the limit": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, initial_position=2**62 + 1)),
        INVALID,
        "INVALID_REQUEST",
    ),
    "wrong dtype": (_bad_step(x=from_array(_x(1).astype(np.float64))), INVALID, "INVALID_TENSOR"),
    "unspecified dtype": (_bad_step(x=_tensor(_x(1), dtype=0)), INVALID, "INVALID_TENSOR"),
    "wrong shape": (
        _bad_step(x=from_array(np.zeros((1, 5), np.float32))),
        INVALID,
        "INVALID_TENSOR",
    ),
    "wrong rank": (_bad_step(x=from_array(np.zeros((4,), np.float32))), INVALID, "INVALID_TENSOR"),
    "byte length": (_bad_step(x=_tensor(_x(2), shape=[3, 4])), INVALID, "INVALID_TENSOR"),
    "negative extent": (_bad_step(x=_tensor(_x(1), shape=[-1, 4])), INVALID, "INVALID_TENSOR"),
    "NaN": (_bad_step(x=from_array(_NAN)), INVALID, "INVALID_TENSOR"),
    "zero timesteps": (
        _bad_step(x=from_array(np.zeros((0, 4), np.float32))),
        INVALID,
        "INVALID_TENSOR",
    ),
    "too many timesteps": (_bad_step(x=from_array(_x(4097))), INVALID, "INVALID_TENSOR"),
    "missing input": (_bad_step(), INVALID, "INVALID_TENSOR"),
    "state sent as input": (
        _bad_step(x=from_array(_x(1)), initial_h=from_array(np.zeros((1, 7), np.float32))),
        INVALID,
        "INVALID_TENSOR",
    ),
    "bad initial state": (
        lambda s: s.OpenSession(
            pb.OpenSessionRequest(
                model=MODEL, initial_state={"initial_h": from_array(np.zeros((7,), np.float32))}
            )
        ),
        INVALID,
        "INVALID_TENSOR",
    ),
    "bad reset state": (
        lambda s: s.ResetSession(
            pb.ResetSessionRequest(
                session_id=SID, state={"initial_h": from_array(np.zeros((1, 8), np.float32))}
            )
        ),
        INVALID,
        "INVALID_TENSOR",
    ),
    "rank 100": (
        _bad_step(x=_tensor(np.zeros((1,), np.float32), shape=[1] * 100)),
        INVALID,
        "INVALID_TENSOR",
    ),
    "10,000-character session id": (
        lambda s: s.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="a" * 10_000)),
        INVALID,
        "INVALID_REQUEST",
    ),
    "position mismatch": (
        lambda s: step(s, SID, "x", _x(1), expected_position=99),
        grpc.StatusCode.FAILED_PRECONDITION,
        "POSITION_MISMATCH",
    ),
}


@pytest.fixture(scope="module")
def victim(server: ServerProcess):  # noqa: ANN201
    """A session at a known position, to prove that no error touches its state."""
    with stub_for(server.address) as stub:
        stub.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=SID))
        yield stub


@pytest.mark.parametrize("case", list(CASES))
def test_error_path_has_its_status_and_changes_nothing(victim, test_repository, case: str) -> None:  # noqa: ANN001
    stub = victim
    call, code, reason = CASES[case]
    model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
    exported = stub.ExportState(pb.ExportStateRequest(session_id=SID))
    before = {k: v for k, v in exported.state.items()}
    position = exported.session.position
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    error = info.value
    assert error.code() == code, error.details()
    assert reason_of(error) == reason
    details = dict(error.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    decoded = error_details_pb2.ErrorInfo()
    infos[0].Unpack(decoded)
    assert (decoded.reason, decoded.domain) == (reason, "rnnserve")
    after = stub.ExportState(pb.ExportStateRequest(session_id=SID))
    assert after.session.position == position
    assert dict(after.state) == before
    x = _x(2, seed=position)
    state = {k: np.frombuffer(v.data, np.float32).reshape(v.shape) for k, v in before.items()}
    got = outputs_of(step(stub, SID, "x", x, expected_position=position))
    assert_close(got, reference(test_repository, model, x, state))


def test_stream_answers_a_bad_step_and_goes_on(server: ServerProcess, test_repository) -> None:  # noqa: ANN001
    with stub_for(server.address) as stub:
        model = stub.GetModel(pb.GetModelRequest(name=MODEL)).model
        sid = stub.OpenSession(pb.OpenSessionRequest(model=MODEL)).session.session_id
        x = _x(3, seed=11)
        steps = [
            pb.StepRequest(session_id=sid, request_id="0", inputs={"x": from_array(x[:1])}),
            pb.StepRequest(session_id=sid, request_id="bad", inputs={"x": from_array(x[:1, :2])}),
            pb.StepRequest(session_id="ghost", request_id="ghost"),
            pb.StepRequest(session_id=sid, request_id="1", inputs={"x": from_array(x[1:])}),
        ]
        results = [
            r
            for message in stub.StreamSteps(iter([pb.StreamStepsRequest(steps=steps)]))
            for r in message.results
        ]
    by_id = {r.request_id: r for r in results}
    assert [r.request_id for r in results if r.session_id == sid] == ["0", "bad", "1"]
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_id["ghost"].error.reason == "SESSION_NOT_FOUND"
    got = {"Y": np.concatenate([outputs_of(by_id[i].response)["Y"] for i in ("0", "1")])}
    assert_close(got, reference(test_repository, model, x))


def test_unknown_model_names_never_become_metric_labels(server: ServerProcess) -> None:
    with stub_for(server.address) as stub:
        for n in range(20):
            with pytest.raises(grpc.RpcError) as info:
                stub.OpenSession(pb.OpenSessionRequest(model=f"made-up-{n}-<script>"))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
    page = metric(server.metrics_port, "rnnserve_requests_total")
    assert not [labels for labels in page if "made-up" in labels]
    assert sum(v for k, v in page.items() if 'method="OpenSession"' in k and 'model=""' in k) >= 20


def test_a_long_session_id_is_not_echoed_whole(server: ServerProcess) -> None:
    with stub_for(server.address) as stub, pytest.raises(grpc.RpcError) as info:
        stub.GetSession(pb.GetSessionRequest(session_id="b" * 10_000))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details()) < 300
