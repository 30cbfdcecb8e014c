"""onnxruntime sessions: choosing the provider, checking the graph against the config.

CUDA is requested only when onnxruntime reports a GPU build *and* the CUDA provider is
listed, and then kept only if the created session really reports it; otherwise CPU, with
one log line saying why. Each model version gets one dedicated executor thread, so ORT runs
off the event loop and runs of one model never contend with each other.

Note on device-resident state: the state slabs (:mod:`rnnserve.server.sessions`) keep the
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
import onnx
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
    where = f"{config_path}: field"
    _check_axes(where, config, graph_inputs, graph_outputs)
    _check_state_wiring(where, config, model_path)
    _probe(where, config, session)


def _declared_axes(config: ModelConfig) -> list[tuple[str, str, bool, int, int]]:
    """(field, graph name, is_input, batch_axis, time_axis) of every declared tensor."""
    rows = [
        (f"inputs[{n}]", t.name, True, t.batch_axis, t.time_axis)
        for n, t in enumerate(config.inputs)
    ]
    rows += [
        (f"outputs[{n}]", t.name, False, t.batch_axis, t.time_axis)
        for n, t in enumerate(config.outputs)
    ]
    for n, s in enumerate(config.states):
        rows.append((f"states[{n}]", s.input, True, s.batch_axis, -1))
        rows.append((f"states[{n}]", s.output, False, s.batch_axis, -1))
    return rows


def _check_axes(where: str, config: ModelConfig, graph_inputs: dict, graph_outputs: dict) -> None:
    """A batch or time axis must be dynamic in the graph, and a named dimension is one thing.

    A batch axis that the graph fixes (say the ``num_directions`` axis of an ONNX ``Y``, extent
    1) would make the server hand one session's row of a batch to another, so it is refused.
    """
    batch_names: dict[str, str] = {}
    time_names: dict[str, str] = {}
    for field, name, is_input, batch_axis, time_axis in _declared_axes(config):
        dims = (graph_inputs if is_input else graph_outputs)[name].shape
        for axis, role, names in (
            (batch_axis, "batch", batch_names),
            (time_axis, "time", time_names),
        ):
            if axis == -1:
                continue
            dim = dims[axis]
            if isinstance(dim, int):
                raise ConfigError(
                    f"{where} {field}.{role}_axis: axis {axis} of {name!r} has the fixed extent "
                    f"{dim} in the graph (shape {_shape(dims)}); a {role} axis must be dynamic "
                    + (
                        "(a fixed axis cannot hold one row per session)"
                        if role == "batch"
                        else "(does this tensor have a time axis at all? omit time_axis if not)"
                    )
                )
            if isinstance(dim, str) and dim:
                names.setdefault(dim, f"{field} ({name!r} axis {axis})")
    for dim, batch_field in batch_names.items():
        if dim in time_names:
            raise ConfigError(
                f"{where} {batch_field}: its batch axis is the graph dimension {dim!r}, which "
                f"{time_names[dim]} declares as its time axis; the batch axes of inputs, "
                "outputs and states must be the same graph dimension"
            )


def _shape(dims: list[object]) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in dims) + "]"


#: Ops that pass a recurrent node's state through unchanged in meaning (layer split, squeeze).
_STATE_PASS = {
    "Split",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Gather",
    "Identity",
    "Reshape",
    "Transpose",
    "Cast",
    "Concat",
}
_RECURRENT_SLOTS = {"RNN": 1, "GRU": 1, "LSTM": 2}


def state_roles(
    graph: onnx.GraphProto,
) -> tuple[dict[str, set[tuple[str, str]]], dict[str, set[tuple[str, str]]]]:
    """Which recurrent node state slots each graph input feeds and each graph output comes from.

    A role is ``(node, "h")`` or ``(node, "c")``: a graph input reaching ``initial_h`` of an
    ``RNN``/``LSTM``/``GRU`` node (input 5; ``initial_c`` is input 6), a graph output produced
    from ``Y_h`` (output 1; ``Y_c`` is output 2), followed through Split / Squeeze / Unsqueeze
    / Concat and the like of stacked layers. Used to check (and infer) state pairs by wiring.
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    producers: dict[str, tuple[onnx.NodeProto, int]] = {}
    for k, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{k}"
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, slot))
        for slot, name in enumerate(node.output):
            producers[name] = (node, slot)

    def forward(name: str, seen: set[str]) -> set[tuple[str, str]]:
        roles: set[tuple[str, str]] = set()
        for node, slot in consumers.get(name, []):
            if node.op_type in _RECURRENT_SLOTS and slot in (5, 6):
                roles.add((node.name, "h" if slot == 5 else "c"))
            elif node.op_type in _STATE_PASS and slot == 0:
                for out in node.output:
                    if out not in seen:
                        seen.add(out)
                        roles |= forward(out, seen)
        return roles

    def backward(name: str, seen: set[str]) -> set[tuple[str, str]]:
        found = producers.get(name)
        if found is None:
            return set()
        node, slot = found
        if node.op_type in _RECURRENT_SLOTS and slot in (1, 2):
            return {(node.name, "h" if slot == 1 else "c")}
        if node.op_type not in _STATE_PASS:
            return set()
        sources = node.input if node.op_type == "Concat" else node.input[:1]
        roles: set[tuple[str, str]] = set()
        for source in sources:
            if source and source not in seen:
                seen.add(source)
                roles |= backward(source, seen)
        return roles

    ins = {i.name: forward(i.name, {i.name}) for i in graph.input}
    outs = {o.name: backward(o.name, {o.name}) for o in graph.output}
    return ({k: v for k, v in ins.items() if v}, {k: v for k, v in outs.items() if v})


def _check_state_wiring(where: str, config: ModelConfig, model_path: Path) -> None:
    """A pair whose input and output are different slots of the recurrent nodes is refused.

    Pairing ``initial_h`` with ``Y_c`` passes every shape check of an LSTM and then feeds the
    cell state back as the hidden state: wrong outputs, no error. The graph's wiring says.
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # onnxruntime loaded it; a file onnx cannot parse is left to it
        return
    ins, outs = state_roles(proto.graph)
    for n, s in enumerate(config.states):
        fed, made = ins.get(s.input), outs.get(s.output)
        if fed and made and fed != made:
            right = [o for o, roles in outs.items() if roles == fed]
            hint = f"; the graph pairs {s.input!r} with {right[0]!r}" if right else ""
            raise ConfigError(
                f"{where} states[{n}].output: {s.input!r} feeds {_roles(fed)} but {s.output!r} "
                f"comes from {_roles(made)}, so the session's state would be fed back into the "
                f"wrong slot{hint}"
            )


def _roles(roles: set[tuple[str, str]]) -> str:
    slot = {"h": "initial_h/Y_h", "c": "initial_c/Y_c"}
    return ", ".join(f"{slot[r]} of node {node!r}" for node, r in sorted(roles))


#: Check runs: (sessions, timesteps), all four numbers distinct so a swapped or fixed axis
#: shows; the first run is also split into single sessions.
PROBE_RUNS = ((3, 2), (2, 5))


def _probe_array(shape: list[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    from .config import DTYPES

    if dtype.startswith("int"):
        return rng.integers(0, 2, shape).astype(DTYPES[dtype])
    return (rng.standard_normal(shape) * 0.5).astype(DTYPES[dtype])


def _probe(where: str, config: ModelConfig, session: ort.InferenceSession) -> None:
    """Run the graph with 3 sessions of 2 timesteps and 2 of 5, then each of the 3 alone.

    The outputs must have as many rows on each declared batch axis as there are sessions and
    as many steps on each declared time axis as there were timesteps, every state output
    must come back in its input's shape, and each session's rows must be what it gets alone:
    that is what lets the server batch sessions without one session's data reaching another.
    """
    rng = np.random.default_rng(0)
    graph_inputs = {i.name: i for i in session.get_inputs()}
    names = [t.name for t in config.outputs] + [s.output for s in config.states]
    batch_axes = [t.batch_axis for t in config.outputs] + [s.batch_axis for s in config.states]
    fields = [f"outputs[{n}]" for n in range(len(config.outputs))]
    fields += [f"states[{n}]" for n in range(len(config.states))]
    feed_axes = {t.name: t.batch_axis for t in config.inputs}
    feed_axes.update({s.input: s.batch_axis for s in config.states})

    def make_feeds(batch: int, steps: int) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for t in config.inputs:
            shape = []
            for axis, extent in enumerate(t.shape):
                dim = graph_inputs[t.name].shape[axis]
                if axis == t.batch_axis:
                    shape.append(batch)
                elif axis == t.time_axis:
                    shape.append(steps)
                else:
                    shape.append(extent if extent != -1 else dim if isinstance(dim, int) else 1)
            feeds[t.name] = _probe_array(shape, t.dtype, rng)
        for s in config.states:
            shape = [batch if axis == s.batch_axis else e for axis, e in enumerate(s.shape)]
            feeds[s.input] = _probe_array(shape, s.dtype, rng)
        return feeds

    def run(values: dict[str, np.ndarray], sessions: int, steps: int) -> list[np.ndarray]:
        try:
            return session.run(names, values)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            message = str(exc).strip().splitlines()[-1][:300]
            raise ConfigError(
                f"{where} inputs/states: a check run of the graph with {sessions} session(s) "
                f"of {steps} timesteps failed ({message}); are the batch_axis, time_axis and "
                "static extents right?"
            ) from None

    for batch, steps in PROBE_RUNS:
        feeds = make_feeds(batch, steps)
        values = run(feeds, batch, steps)
        for field, name, axis, value in zip(fields, names, batch_axes, values, strict=True):
            if value.ndim <= axis or value.shape[axis] != batch:
                raise ConfigError(
                    f"{where} {field}.batch_axis: {name!r} came back with shape "
                    f"{list(value.shape)} from a batch of {batch} sessions; axis {axis} is not "
                    "its batch axis"
                )
        for n, t in enumerate(config.outputs):
            value = values[n]
            if t.time_axis != -1 and value.shape[t.time_axis] != steps:
                raise ConfigError(
                    f"{where} outputs[{n}].time_axis: {t.name!r} came back with shape "
                    f"{list(value.shape)} from {steps} timesteps; axis {t.time_axis} is not a "
                    "time axis (omit time_axis if it has none)"
                )
        for n, s in enumerate(config.states):
            value = values[len(config.outputs) + n]
            if list(value.shape) != list(feeds[s.input].shape):
                raise ConfigError(
                    f"{where} states[{n}].output: {s.output!r} came back with shape "
                    f"{list(value.shape)} but {s.input!r} takes {list(feeds[s.input].shape)}; "
                    "a state output must be the next value of its own input"
                )
        if (batch, steps) == PROBE_RUNS[0]:
            first, together = feeds, values
    feeds = first
    batch, steps = PROBE_RUNS[0]
    for row in range(batch):
        alone = {name: np.take(value, [row], axis=feed_axes[name]) for name, value in feeds.items()}
        for field, name, axis, mixed, single in zip(
            fields, names, batch_axes, together, run(alone, 1, steps), strict=True
        ):
            want = np.take(single, 0, axis=axis).astype(np.float64)
            got = np.take(mixed, row, axis=axis).astype(np.float64)
            scale = max(1.0, float(np.abs(want).max(initial=0.0)))
            if got.shape != want.shape or float(np.abs(got - want).max(initial=0.0)) > 1e-4 * scale:
                raise ConfigError(
                    f"{where} {field}.batch_axis: session {row} of a batch of {batch} got "
                    f"other values of {name!r} than it gets alone: the declared batch axes do "
                    "not keep sessions apart (are the inputs' and states' batch_axis the same "
                    "graph dimension?)"
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
