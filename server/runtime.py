"""onnxruntime sessions: choosing the provider, checking the graph against the config.

CUDA is requested only when onnxruntime reports a GPU build *and* the CUDA provider is
listed, and then kept only if the created session really reports it; otherwise CPU, with
one log line saying why. Each model version gets one dedicated executor thread, so ORT runs
off the event loop and runs of one model never contend with each other.

Note on device-resident state: the state slabs (:mod:`rnnserve.server.engine.store`) keep the
batch axis first so one batch's rows are a single gather. With CUDA, the same layout maps
onto ``OrtValue`` slabs on the device and ``IOBinding`` (bind gathered inputs, bind outputs
to device buffers, scatter on device), so state never visits the host; CPU is what runs
here, so the numpy slabs are the implementation.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import ModelConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def choose_providers() -> tuple[list[str], str]:
    """The providers to request, and why (for the log line)."""
    available = ort.get_available_providers()
    if ort.get_device() != "GPU" or "CUDAExecutionProvider" not in available:
        return ["CPUExecutionProvider"], "onnxruntime has no usable CUDA provider"
    try:
        import ctypes

        ctypes.CDLL("libcudart.so.12")
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return ["CPUExecutionProvider"], f"CUDA libraries do not load ({exc})"
    return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA available"


def create_session(model_path: Path, providers: list[str]) -> ort.InferenceSession:
    """An ORT session on ``providers``, falling back to CPU if CUDA did not take."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ConfigError(f"{model_path}: onnxruntime cannot load the model: {exc}") from None
    if providers[0] == "CUDAExecutionProvider" and session.get_providers()[0] != providers[0]:
        logger.info("event=provider model=%s provider=CPU reason=cuda-did-not-take", model_path)
    return session


def check_graph(
    config_path: Path, model_path: Path, config: ModelConfig, session: ort.InferenceSession
) -> None:
    """Every declared name must exist in the graph with the declared dtype and rank."""
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    declared: list[tuple[str, str, str, list[int], dict]] = []
    for n, t in enumerate(config.inputs):
        declared.append((f"inputs[{n}].name", t.name, t.dtype, t.shape, graph_inputs))
    for n, t in enumerate(config.outputs):
        declared.append((f"outputs[{n}].name", t.name, t.dtype, t.shape, graph_outputs))
    for n, s in enumerate(config.states):
        declared.append((f"states[{n}].input", s.input, s.dtype, s.shape, graph_inputs))
        declared.append((f"states[{n}].output", s.output, s.dtype, s.shape, graph_outputs))
    for field, name, dtype, shape, graph in declared:
        if name not in graph:
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} is not in {model_path.name} "
                f"(graph has {sorted(graph)})"
            )
        node = graph[name]
        if _ORT_TYPES.get(node.type) != dtype:
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} is {node.type} in the graph, "
                f"config says {dtype}"
            )
        if len(node.shape) != len(shape):
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} has rank {len(node.shape)} in the "
                f"graph, config shape {shape} has rank {len(shape)}"
            )
        for axis, (g, c) in enumerate(zip(node.shape, shape, strict=True)):
            if isinstance(g, int) and c != -1 and g != c:
                raise ConfigError(
                    f"{config_path}: field {field}: {name!r} axis {axis} is {g} in the graph, "
                    f"config says {c}"
                )
    required = {name for name, i in graph_inputs.items()}
    missing = required - {d[1] for d in declared if d[4] is graph_inputs}
    if missing:
        raise ConfigError(
            f"{config_path}: field inputs: graph inputs {sorted(missing)} are not declared"
        )


class Runner:
    """Runs one model version's ORT session on its own single worker thread."""

    def __init__(self, session: ort.InferenceSession, name: str) -> None:
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Blocking run: on :attr:`executor`, or inline for small fast batches (batcher.py)."""
        return self.session.run(output_names, feeds)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
