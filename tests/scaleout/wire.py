"""Raw rnnserve.v1 calls the scale-out tests share: one session's steps, its reference."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from deploy.stubs import from_tensor, to_tensor
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

MODEL = "tiny_lstm"
TIMEOUT_S = 30.0
SESSION_HEADER = "x-rnnserve-session-id"


def inputs(seed: int, steps: int, timesteps: int = 1) -> list[np.ndarray]:
    """``steps`` chunks of shape (timesteps, 4), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((timesteps, 4), dtype=np.float32) for _ in range(steps)]


def metadata(session_id: str, token: str | None = None) -> list[tuple[str, str]]:
    found = [(SESSION_HEADER, session_id)]
    if token is not None:
        found.append(("authorization", f"Bearer {token}"))
    return found


def step(
    stub: pb_grpc.InferenceServiceStub,
    session_id: str,
    x: np.ndarray,
    *,
    expected_position: int | None = None,
    token: str | None = None,
) -> pb.StepResponse:
    request = pb.StepRequest(session_id=session_id, inputs={"x": to_tensor(x)})
    if expected_position is not None:
        request.expected_position = expected_position
    return stub.Step(request, metadata=metadata(session_id, token), timeout=TIMEOUT_S)


def open_session(
    stub: pb_grpc.InferenceServiceStub, session_id: str, token: str | None = None
) -> pb.Session:
    request = pb.OpenSessionRequest(model=MODEL, session_id=session_id)
    reply = stub.OpenSession(request, metadata=metadata(session_id, token), timeout=TIMEOUT_S)
    return reply.session


def output(reply: pb.StepResponse) -> np.ndarray:
    return from_tensor(reply.outputs["Y"]).copy()


def run_steps(
    stub: pb_grpc.InferenceServiceStub, session_id: str, xs: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Step ``xs`` one by one (each alone in its batch); the outputs."""
    return [output(step(stub, session_id, x)) for x in xs]


def code_of(
    call: object, request: object, session_id: str, token: str | None = None
) -> grpc.StatusCode:
    try:
        call(request, metadata=metadata(session_id, token), timeout=TIMEOUT_S)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK
