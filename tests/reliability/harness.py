"""What the reliability and security tests share: a small LSTM repository and its inputs.

Servers are started with :class:`rnnserve.testing.ServerProcess`, a real child process
(``rnnserve serve``) that the tests can SIGTERM, kill -9 and restart; the models are built by
:func:`rnnserve.testing.cell_model`, with the input named ``X``.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from rnnserve.server.frontend.tensors import from_array
from rnnserve.server.frontend.tensors import to_array as _to_array
from rnnserve.testing import INPUT_SIZE, ServerProcess, cell_model
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

__all__ = [
    "HIDDEN_SIZE",
    "INPUT_SIZE",
    "MODEL",
    "NAN_OK_MODEL",
    "ServerProcess",
    "build_lstm",
    "build_repository",
    "inputs_for",
    "step_request",
    "stub",
    "tensor",
    "to_array",
]

HIDDEN_SIZE = 8
MODEL = "lstm"
NAN_OK_MODEL = "lstm_nan_ok"


def build_lstm(path: Path, *, seed: int = 0) -> None:
    """An ONNX LSTM (one layer, input ``X``) with seeded random weights, saved at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cell_model("LSTM", HIDDEN_SIZE, seed, {}, input_name="X"))


def _config(*, nan_policy: str, max_sessions: int, max_timesteps: int, on_full: str) -> str:
    return f"""cell_kind = "lstm"
description = "test LSTM"

[[inputs]]
name = "X"
dtype = "float32"
shape = [-1, -1, {INPUT_SIZE}]
batch_axis = 1
time_axis = 0

[[outputs]]
name = "Y"
dtype = "float32"
shape = [-1, 1, -1, {HIDDEN_SIZE}]
batch_axis = 2
time_axis = 0

[[states]]
input = "initial_c"
output = "Y_c"
dtype = "float32"
shape = [1, -1, {HIDDEN_SIZE}]
batch_axis = 1

[[states]]
input = "initial_h"
output = "Y_h"
dtype = "float32"
shape = [1, -1, {HIDDEN_SIZE}]
batch_axis = 1

[limits]
max_batch_size = 64
max_queue_delay_us = 200
max_sessions = {max_sessions}
idle_timeout_s = 600
max_timesteps = {max_timesteps}
on_full = "{on_full}"
nan_policy = "{nan_policy}"
"""


def build_repository(
    root: Path,
    *,
    max_sessions: int = 2000,
    max_timesteps: int = 64,
    seed: int = 0,
) -> Path:
    """A repository with ``lstm`` (NaN rejected) and ``lstm_nan_ok`` (NaN allowed)."""
    for name, policy in ((MODEL, "reject"), (NAN_OK_MODEL, "allow")):
        folder = root / name
        build_lstm(folder / "1" / "model.onnx", seed=seed)
        (folder / "config.toml").write_text(
            _config(
                nan_policy=policy,
                max_sessions=max_sessions,
                max_timesteps=max_timesteps,
                on_full="reject",
            )
        )
    return root


def tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """A numpy array as an rnnserve.v1 Tensor."""
    return from_array(np.ascontiguousarray(array))


def to_array(message: tensor_pb2.Tensor) -> np.ndarray:
    return _to_array(message, "tensor")


def inputs_for(session_index: int, step: int, timesteps: int = 1) -> np.ndarray:
    """Deterministic inputs of one session's step: the same on every run."""
    rng = np.random.default_rng([session_index, step])
    return rng.standard_normal((timesteps, INPUT_SIZE)).astype(np.float32)


def step_request(session_id: str, x: np.ndarray, **fields: object) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, inputs={"X": tensor(x)}, **fields)  # type: ignore[arg-type]


def stub(channel: grpc.aio.Channel | grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)
