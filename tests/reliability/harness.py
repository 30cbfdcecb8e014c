"""A real rnnserve server process on loopback, serving a small LSTM built at test time.

Reliability and security tests need a server they can SIGTERM, kill -9 and restart, so it
runs as a child process (``rnnserve serve``) rather than inside the test's event loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

INPUT_SIZE = 4
HIDDEN_SIZE = 8
MODEL = "lstm"
NAN_OK_MODEL = "lstm_nan_ok"


def build_lstm(path: Path, *, seed: int = 0) -> None:
    """An ONNX LSTM (one layer) with seeded random weights, saved at ``path``."""
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(HIDDEN_SIZE)
    weights = {
        "W": rng.uniform(-scale, scale, (1, 4 * HIDDEN_SIZE, INPUT_SIZE)),
        "R": rng.uniform(-scale, scale, (1, 4 * HIDDEN_SIZE, HIDDEN_SIZE)),
        "B": rng.uniform(-scale, scale, (1, 8 * HIDDEN_SIZE)),
    }
    initializers = [
        numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()
    ]
    node = helper.make_node(
        "LSTM",
        ["X", "W", "R", "B", "", "initial_h", "initial_c"],
        ["Y", "Y_h", "Y_c"],
        hidden_size=HIDDEN_SIZE,
    )
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "lstm",
        [
            helper.make_tensor_value_info("X", f32, ["T", "B", INPUT_SIZE]),
            helper.make_tensor_value_info("initial_h", f32, [1, "B", HIDDEN_SIZE]),
            helper.make_tensor_value_info("initial_c", f32, [1, "B", HIDDEN_SIZE]),
        ],
        [
            helper.make_tensor_value_info("Y", f32, ["T", 1, "B", HIDDEN_SIZE]),
            helper.make_tensor_value_info("Y_h", f32, [1, "B", HIDDEN_SIZE]),
            helper.make_tensor_value_info("Y_c", f32, [1, "B", HIDDEN_SIZE]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ServerProcess:
    """One ``rnnserve serve`` child process and how to reach it."""

    repository: Path
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    port: int = 0
    metrics_port: int = 0
    health_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *, health_port: bool = False, timeout_s: float = 60.0) -> ServerProcess:
        """Start the server and wait until its health check says SERVING.

        With ``health_port`` the health service also listens on a port of its own (plain
        text), which is where readiness is probed: the main port may need TLS.
        """
        self.port, self.metrics_port = free_port(), free_port()
        self.health_port = free_port() if health_port else 0
        command = [
            str(Path(sys.executable).parent / "rnnserve"),
            "serve",
            "--repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            *(("--health-port", str(self.health_port)) if self.health_port else ()),
            *self.extra_args,
        ]
        log = open(self.log_path or os.devnull, "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.log()}")
            with contextlib.suppress(grpc.RpcError):
                probe = f"127.0.0.1:{self.health_port}" if self.health_port else self.target
                with grpc.insecure_channel(probe) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready in {timeout_s} s: {self.log()}")

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over every series whose labels include ``labels``."""
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            series, _, value = line.rpartition(" ")
            if series != name and not series.startswith(name + "{"):
                continue
            if all(f'{key}="{want}"' in series for key, want in labels.items()):
                total += float(value)
        return total


@contextlib.contextmanager
def running(repository: Path, log_path: Path, *args: str, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(repository, args, env, log_path).start()
    try:
        yield server
    finally:
        server.stop()


def tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """A float32/other numpy array as an rnnserve.v1 Tensor."""
    dtypes = {
        np.dtype(np.float32): tensor_pb2.DATA_TYPE_FLOAT32,
        np.dtype(np.float16): tensor_pb2.DATA_TYPE_FLOAT16,
        np.dtype(np.float64): tensor_pb2.DATA_TYPE_FLOAT64,
        np.dtype(np.int32): tensor_pb2.DATA_TYPE_INT32,
        np.dtype(np.int64): tensor_pb2.DATA_TYPE_INT64,
    }
    array = np.ascontiguousarray(array)
    return tensor_pb2.Tensor(
        dtype=dtypes[array.dtype],
        shape=list(array.shape),
        data=array.astype("<" + array.dtype.str[1:]).tobytes(),
    )


def to_array(message: tensor_pb2.Tensor) -> np.ndarray:
    names = {
        tensor_pb2.DATA_TYPE_FLOAT32: "<f4",
        tensor_pb2.DATA_TYPE_FLOAT16: "<f2",
        tensor_pb2.DATA_TYPE_FLOAT64: "<f8",
        tensor_pb2.DATA_TYPE_INT32: "<i4",
        tensor_pb2.DATA_TYPE_INT64: "<i8",
    }
    return np.frombuffer(message.data, dtype=names[message.dtype]).reshape(tuple(message.shape))


def inputs_for(session_index: int, step: int, timesteps: int = 1) -> np.ndarray:
    """Deterministic inputs of one session's step: the same on every run."""
    rng = np.random.default_rng([session_index, step])
    return rng.standard_normal((timesteps, INPUT_SIZE)).astype(np.float32)


def step_request(session_id: str, x: np.ndarray, **fields: object) -> pb.StepRequest:
    return pb.StepRequest(session_id=session_id, inputs={"X": tensor(x)}, **fields)  # type: ignore[arg-type]


def stub(channel: grpc.aio.Channel | grpc.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)
