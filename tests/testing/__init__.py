"""``rnnserve.testing``: a tiny model repository, a real server process, a reference run.

Used by the tests of every part, the benchmark and the demo; it lives with the tests, out of
the production server package.

The models are single ONNX ``RNN``/``LSTM``/``GRU`` nodes built with ``onnx.helper`` from
seeded random weights (no torch), laid out as onnxruntime's operators are: input ``x`` of
shape (T, B, 4), state tensors (1, B, H) with the batch on axis 1, and ``Y`` of shape
(T, 1, B, H) with its num_directions axis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import numpy as np

INPUT_SIZE = 4
HIDDEN = {"tiny_rnn": 6, "tiny_lstm": 8, "tiny_peephole": 8, "tiny_gru": 7, "tiny_gru_torch": 5}
TEST_MODELS = tuple(HIDDEN)


def cell_model(
    op: str,
    hidden: int,
    seed: int,
    attrs: dict,
    peephole: bool = False,
    input_name: str = "x",
) -> bytes:
    """One recurrent node with its weights as initializers, serialized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        value = (rng.standard_normal(shape) * 0.4).astype(np.float32)
        return numpy_helper.from_array(value, name)

    inits = [
        weight("W", 1, gates * hidden, INPUT_SIZE),
        weight("R", 1, gates * hidden, hidden),
        weight("B", 1, 2 * gates * hidden),
    ]
    node_inputs = [input_name, "W", "R", "B", "", "initial_h"]
    graph_inputs = [
        helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["T", "N", INPUT_SIZE]),
        helper.make_tensor_value_info("initial_h", TensorProto.FLOAT, [1, "N", hidden]),
    ]
    node_outputs = ["Y", "Y_h"]
    graph_outputs = [
        helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["T", 1, "N", hidden]),
        helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [1, "N", hidden]),
    ]
    if op == "LSTM":
        node_inputs.append("initial_c")
        graph_inputs.append(
            helper.make_tensor_value_info("initial_c", TensorProto.FLOAT, [1, "N", hidden])
        )
        node_outputs.append("Y_c")
        graph_outputs.append(
            helper.make_tensor_value_info("Y_c", TensorProto.FLOAT, [1, "N", hidden])
        )
        if peephole:
            inits.append(weight("P", 1, 3 * hidden))
            node_inputs.append("P")
    node = helper.make_node(op, node_inputs, node_outputs, hidden_size=hidden, **attrs)
    graph = helper.make_graph([node], f"tiny_{op.lower()}", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _config(cell_kind: str, hidden: int, lstm: bool, limits: Mapping[str, object]) -> str:
    """A config.toml; LSTM pairs are declared c first, the opposite of the graph's order."""
    lines = [
        f'cell_kind = "{cell_kind}"',
        f'description = "hand-built {cell_kind} test model"',
        "",
        "[[inputs]]",
        'name = "x"',
        'dtype = "float32"',
        f"shape = [-1, -1, {INPUT_SIZE}]",
        "batch_axis = 1",
        "time_axis = 0",
        "",
        "[[outputs]]",
        'name = "Y"',
        'dtype = "float32"',
        f"shape = [-1, 1, -1, {hidden}]",
        "batch_axis = 2",
        "time_axis = 0",
    ]
    pairs = [("initial_c", "Y_c"), ("initial_h", "Y_h")] if lstm else [("initial_h", "Y_h")]
    for state_in, state_out in pairs:
        lines += [
            "",
            "[[states]]",
            f'input = "{state_in}"',
            f'output = "{state_out}"',
            'dtype = "float32"',
            f"shape = [1, -1, {hidden}]",
            "batch_axis = 1",
        ]
    lines += ["", "[limits]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in limits.items()]
    lines += ["", "[metadata]", f'test = "{cell_kind}"', ""]
    return "\n".join(lines)


def build_test_repository(root: Path, limits: Mapping[str, object] | None = None) -> Path:
    """Write tiny_rnn, tiny_lstm (versions 1 and 2), tiny_peephole, tiny_gru, tiny_gru_torch."""
    root = Path(root)
    if limits is None:
        limits = {"max_queue_delay_us": 2000, "max_sessions": 1000}
    specs = {
        "tiny_rnn": ("rnn", "RNN", {}, False),
        "tiny_lstm": ("lstm", "LSTM", {}, False),
        "tiny_peephole": ("peephole_lstm", "LSTM", {}, True),
        "tiny_gru": ("gru", "GRU", {"linear_before_reset": 0}, False),
        "tiny_gru_torch": ("gru_torch", "GRU", {"linear_before_reset": 1}, False),
    }
    for seed, (name, (kind, op, attrs, peephole)) in enumerate(specs.items()):
        hidden = HIDDEN[name]
        model_dir = root / name
        versions = ["1", "2"] if name == "tiny_lstm" else ["1"]
        for n, version in enumerate(versions):
            (model_dir / version).mkdir(parents=True, exist_ok=True)
            blob = cell_model(op, hidden, seed * 10 + n, attrs, peephole)
            (model_dir / version / "model.onnx").write_bytes(blob)
        (model_dir / "config.toml").write_text(
            _config(kind, hidden, op == "LSTM", limits), encoding="utf-8"
        )
    return root


def run_reference(
    repository: Path,
    model: str,
    version: str,
    inputs: Mapping[str, np.ndarray],
    initial_state: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Run one whole sequence through onnxruntime directly (batch of one).

    ``inputs``/``initial_state`` are per-session arrays (batch axis removed). Returns the
    outputs by name and the final state by pair name (the state input's name).
    """
    import onnxruntime as ort
    from rnnserve.server.config import DTYPES, load_model_config

    model_dir = Path(repository) / model
    config = load_model_config(model_dir / "config.toml")
    if not version:
        version = str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()))
    session = ort.InferenceSession(
        str(model_dir / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        feeds[spec.name] = np.expand_dims(np.asarray(inputs[spec.name]), spec.batch_axis)
    for state in config.states:
        given = (initial_state or {}).get(state.input)
        per_session = np.zeros(state.session_shape, DTYPES[state.dtype]) if given is None else given
        feeds[state.input] = np.expand_dims(np.asarray(per_session), state.batch_axis)
    names = [o.name for o in config.outputs] + [s.output for s in config.states]
    values = session.run(names, feeds)
    result: dict[str, np.ndarray] = {}
    for spec, value in zip(config.outputs, values, strict=False):
        result[spec.name] = np.take(value, 0, axis=spec.batch_axis)
    for state, value in zip(config.states, values[len(config.outputs) :], strict=True):
        result[state.input] = np.take(value, 0, axis=state.batch_axis)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """``python -m rnnserve.server serve`` on 127.0.0.1 with free ports, as a context manager."""

    def __init__(
        self,
        repository: Path,
        *extra_args: str,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 60.0,
        log_path: Path | None = None,
        health_port: bool = False,
    ) -> None:
        """``log_path``: append the server's output there (kept after stop, shared by
        restarts); ``health_port``: also serve grpc health on a plain-text port of its own."""
        self.repository = Path(repository)
        self.extra_args = extra_args
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._want_health_port = health_port
        self._log_path = Path(log_path) if log_path else None
        self._dir: Path | None = None  # scratch folder of the running process
        self.final_stderr = ""

    @property
    def port_file(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="rnnserve-test-"))
        return self._dir / "ports.json"

    @property
    def stderr_path(self) -> Path:
        return self._log_path or self.port_file.with_name("stderr.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def stderr(self) -> str:
        if self._log_path is None and self._dir is None:
            return self.final_stderr
        path = self.stderr_path
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def start(self) -> ServerProcess:
        command = [
            sys.executable,
            "-m",
            "rnnserve.server",
            "serve",
            "--repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--port-file",
            str(self.port_file),
            *self.extra_args,
        ]
        if self._want_health_port:
            self.health_port = _free_port()
            command += ["--health-port", str(self.health_port)]
        self.port_file.unlink(missing_ok=True)
        env = {**os.environ, **(self.env or {})}
        with self.stderr_path.open("ab") as err:
            self.process = subprocess.Popen(command, stdout=err, stderr=err, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while not self.port_file.exists():
            if self.process.poll() is not None:
                message = f"server exited with {self.process.returncode}:\n{self.stderr()}"
                self.stop()
                raise RuntimeError(message)
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready in {self.start_timeout_s}s:\n{self.stderr()}")
            time.sleep(0.05)
        ports = json.loads(self.port_file.read_text(encoding="utf-8"))
        self.grpc_port = int(ports["grpc_port"])
        self.metrics_port = int(ports["metrics_port"])
        return self

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, wait, kill after ``timeout_s``; the exit code. Output stays readable."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self._dir is not None:
            self.final_stderr = self.stderr()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return self.process.returncode

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus sample over every series whose labels include ``labels``."""
        import urllib.request

        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:  # noqa: S310
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series != name and not series.startswith(name + "{"):
                continue
            if all(f'{key}="{want}"' in series for key, want in labels.items()):
                total += float(value)
        return total

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
