"""Raw rnnserve.v1 stub calls the deployment tests share (no SDK, so the wire is explicit)."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

SESSION_HEADER = "x-rnnserve-session-id"
TIMEOUT_S = 30.0
MODEL = "tiny_lstm"

_DTYPES = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.float32,
    tensor_pb2.DATA_TYPE_FLOAT64: np.float64,
    tensor_pb2.DATA_TYPE_INT32: np.int32,
    tensor_pb2.DATA_TYPE_INT64: np.int64,
}


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return tensor_pb2.Tensor(
        dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=list(array.shape), data=array.tobytes()
    )


def from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    dtype = np.dtype(_DTYPES[tensor.dtype]).newbyteorder("<")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def header(session_id: str) -> list[tuple[str, str]]:
    return [(SESSION_HEADER, session_id)]


def input_spec(stub: pb_grpc.InferenceServiceStub, model: str = MODEL) -> tuple[str, int]:
    """The model's (only) input name and its feature size."""
    described = stub.GetModel(pb.GetModelRequest(name=model), timeout=TIMEOUT_S).model
    (spec,) = described.inputs
    return spec.name, int(spec.shape[-1])


def run_session(
    stub: pb_grpc.InferenceServiceStub,
    session_id: str,
    input_name: str,
    steps: Sequence[np.ndarray],
    *,
    model: str = MODEL,
    close: bool = True,
) -> list[pb.StepResponse]:
    """Open ``session_id``, stream ``steps`` on one StreamSteps call, optionally close it.

    Every call carries the session header, as the SDK's calls do. Fails on any step error.
    """
    stub.OpenSession(
        pb.OpenSessionRequest(model=model, session_id=session_id),
        metadata=header(session_id),
        timeout=TIMEOUT_S,
    )
    requests = [
        pb.StreamStepsRequest(
            steps=[
                pb.StepRequest(
                    session_id=session_id,
                    inputs={input_name: to_tensor(step)},
                    request_id=str(index),
                )
            ]
        )
        for index, step in enumerate(steps)
    ]
    replies: list[pb.StepResponse] = []
    for message in stub.StreamSteps(iter(requests), metadata=header(session_id), timeout=TIMEOUT_S):
        for result in message.results:
            assert result.WhichOneof("outcome") == "response", f"{session_id}: {result.error}"
            replies.append(result.response)
    assert len(replies) == len(steps), f"{session_id}: {len(replies)} of {len(steps)} answered"
    if close:
        stub.CloseSession(
            pb.CloseSessionRequest(session_id=session_id),
            metadata=header(session_id),
            timeout=TIMEOUT_S,
        )
    return replies


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address)
