"""onnxruntime sessions: choosing the device, checking the graph against the config, running.

The device (``rnnserve serve --device auto|cuda|cpu``) is decided once per server from what
really works, never from what is merely installed: the CUDA and cuDNN libraries are loaded the
way onnxruntime documents (:func:`onnxruntime.preload_dlls`, which finds the ``nvidia-*``
wheels), the CUDA provider's own library must then load, and a driver must report a device.
Only then is CUDA requested, and a session is on CUDA only if ``session.get_providers()``
says so. ``auto`` falls back to CPU with one log line saying why (without onnxruntime's own
loud errors: CUDA is not even requested when it cannot load); ``cuda`` refuses to start.

Where each node of a model runs is read from one profiled warm-up run (the profile names every
kernel's provider): cuDNN has no peephole LSTM, so a peephole model's LSTM may run on the CPU
inside a CUDA session. It is logged, served in ``GetModel`` and exported as a metric.

With state in device memory a batch runs through IOBinding (:meth:`Runner.run_bound`):
client inputs are bound from host arrays, state inputs from the slabs' rows on the session's
device, client outputs come back to the host and state outputs stay on the device for the
slabs' scatter. The same code runs on CPU ``OrtValue``s (``--slabs device``), so the tests
cover the path a GPU takes. With host slabs on CPU a plain ``session.run`` (:meth:`Runner.run`)
is used: binding tensor by tensor measured slower there (docs/server.md). Each model version
gets one executor thread, so runs of one model never contend with each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .config import ModelConfig
from .errors import ConfigError
from .graph_tables import graph_constants, index_range

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PROFILE_PREFIX = "rnnserve-profile-"
#: Operators whose placement is reported (the recurrent cells).
RECURRENT_OPS = frozenset({"RNN", "LSTM", "GRU"})

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


@dataclass(frozen=True)
class DeviceChoice:
    """What sessions are requested on, and why (the one log line)."""

    requested: str  # auto | cuda | cpu: the --device flag
    device: str  # cuda | cpu: where sessions are asked to run
    providers: tuple[str, ...]
    reason: str


def cuda_problem() -> str | None:
    """Why CUDA cannot work in this process, or None if it may (the session has the last word).

    Loads the CUDA/cuDNN libraries first (``onnxruntime.preload_dlls``, its report kept out of
    stdout), then the CUDA provider's own library, whose loader names the first missing
    dependency, then asks the driver for a device.
    """
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    problem = _load_cuda_provider(None)
    if problem is not None:
        # onnxruntime looks for the nvidia-* wheels next to itself; they may be installed
        # elsewhere on sys.path (onnxruntime in a --target folder, CUDA with torch).
        for folder in _nvidia_lib_folders():
            if _load_cuda_provider(folder) is None:
                problem = None
                break
    if problem is not None:
        return problem
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no NVIDIA driver ({_first_line(exc)})"
    count = ctypes.c_int(0)
    status = driver.cuInit(0)
    if status == 0:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver reports error {status} (cuInit/cuDeviceGetCount)"
    if count.value < 1:
        return "the NVIDIA driver sees no CUDA device"
    return None


def _load_cuda_provider(folder: Path | None) -> str | None:
    """Preload CUDA/cuDNN (from ``folder``, or where onnxruntime looks), then load the CUDA
    provider's library; why it does not load, or None."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            try:
                if folder is None:
                    preload()
                else:
                    cuda = folder.parent.name != "cudnn"
                    preload(cuda=cuda, cudnn=not cuda, directory=str(folder))
            except Exception as exc:  # noqa: BLE001 - best effort; the load below decides
                logger.debug("event=preload_dlls_failed folder=%s error=%r", folder, exc)
        logger.debug("event=preload_dlls folder=%s report=%r", folder, report.getvalue())
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return f"the CUDA provider does not load ({_first_line(exc)})"
    return None


def _nvidia_lib_folders() -> list[Path]:
    """``nvidia/<package>/lib`` folders of the NVIDIA wheels anywhere on sys.path, cuDNN last
    (it needs the CUDA libraries loaded first)."""
    import sys

    found: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += [lib for lib in sorted(root.glob("*/lib")) if lib.is_dir()]
    return sorted(dict.fromkeys(found), key=lambda lib: lib.parent.name == "cudnn")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def choose_device(requested: str = "auto") -> DeviceChoice:
    """The device for every session of this server; ``--device cuda`` without CUDA raises
    :class:`ConfigError` naming the flag and the reason."""
    if requested not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return DeviceChoice(requested, "cpu", (CPU,), "--device cpu")
    problem = cuda_problem()
    if problem is None:
        return DeviceChoice(requested, "cuda", (CUDA, CPU), "CUDA libraries and a device found")
    if requested == "cuda":
        raise ConfigError(
            f"--device cuda: CUDA is not usable here: {problem} "
            "(install onnxruntime-gpu with the CUDA 13 / cuDNN 9 libraries, or use --device auto)"
        )
    return DeviceChoice(requested, "cpu", (CPU,), problem)


def choose_providers() -> tuple[list[str], str]:
    """The providers ``--device auto`` requests, and why (for tools that run ORT directly)."""
    choice = choose_device("auto")
    return list(choice.providers), choice.reason


def ort_providers(providers: tuple[str, ...] | list[str], tf32: bool = False) -> list:
    """``providers`` as onnxruntime takes them: CUDA with TF32 matmuls off unless ``tf32``.

    onnxruntime turns TF32 on by default. With it a session's numbers move with its batch's
    size and drift from CPU by ~5e-4 (bench LSTM on an H200; 5e-7 without it), carried into
    every later step through the state, and the answer to a session's step would depend on
    who else was batched with it. Exact FP32 is the default; ``--tf32`` trades that for speed.
    """
    return [(CUDA, {"use_tf32": "1" if tf32 else "0"}) if p == CUDA else p for p in providers]


def create_session(
    model_path: Path,
    providers: tuple[str, ...] | list[str],
    requested: str = "auto",
    tf32: bool = False,
) -> ort.InferenceSession:
    """An ORT session on ``providers``; with ``requested == "cuda"`` it must really be on CUDA.

    Profiling is on for the first run only (:func:`node_placement` reads and ends it).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    profiles = Path(tempfile.mkdtemp(prefix=_PROFILE_PREFIX))
    options.profile_file_prefix = str(profiles / "run")
    try:
        session = ort.InferenceSession(
            str(model_path), options, providers=ort_providers(providers, tf32)
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors
        shutil.rmtree(profiles, ignore_errors=True)
        raise ConfigError(f"{model_path}: onnxruntime cannot load the model: {exc}") from None
    got = session.get_providers()
    if providers[0] == CUDA and got[0] != CUDA:
        if requested == "cuda":
            session.end_profiling()
            shutil.rmtree(profiles, ignore_errors=True)
            raise ConfigError(
                f"--device cuda: onnxruntime did not put {model_path} on CUDA "
                f"(session providers: {', '.join(got)})"
            )
        logger.warning(
            "event=device model=%s device=cpu reason=%r",
            model_path,
            "the CUDA provider did not take (session providers: " + ", ".join(got) + ")",
        )
    return session


def node_placement(session: ort.InferenceSession) -> dict[str, str]:
    """Node -> provider for every node that ran, from one profiled warm-up run.

    The run feeds zeros shaped by the graph (every symbolic axis 1). Ends the profiling the
    session was created with; empty (and logged) if the graph cannot run on zeros.
    """
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        dtype = _ORT_TYPES.get(spec.type)
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        if dtype is None:
            break
        feeds[spec.name] = np.zeros(shape, dtype)
    placement: dict[str, str] = {}
    try:
        if len(feeds) == len(session.get_inputs()):
            session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - placement is a report, never a reason to fail
        logger.warning("event=placement_unknown error=%r", _first_line(exc))
    finally:
        profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text(encoding="utf-8")) if profile.is_file() else []
    finally:
        _remove_profile(profile)
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            node = event.get("name", "").removesuffix("_kernel_time")
            placement[f"{node}:{args.get('op_name', '?')}"] = args["provider"]
    return placement


def discard_profile(session: ort.InferenceSession) -> None:
    """End and delete the profile of a session that will not be used (a failed check)."""
    _remove_profile(Path(session.end_profiling()))


def _remove_profile(profile: Path) -> None:
    if profile.parent.name.startswith(_PROFILE_PREFIX):  # the folder create_session made
        shutil.rmtree(profile.parent, ignore_errors=True)
    else:
        profile.unlink(missing_ok=True)


def recurrent_placement(placement: dict[str, str]) -> dict[str, str]:
    """The recurrent nodes of a placement (``name:op`` -> provider)."""
    return {node: p for node, p in placement.items() if node.rpartition(":")[2] in RECURRENT_OPS}


def check_graph(
    config_path: Path, model_path: Path, config: ModelConfig, session: ort.InferenceSession
) -> None:
    """Every declared name must exist in the graph with the declared dtype and rank."""
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    declared: list[tuple[str, str, str, list[int], dict]] = []
    for n, i in enumerate(config.inputs):
        declared.append((f"inputs[{n}].name", i.name, i.dtype, i.shape, graph_inputs))
    for n, o in enumerate(config.outputs):
        declared.append((f"outputs[{n}].name", o.name, o.dtype, o.shape, graph_outputs))
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
    if session.get_providers()[0] != CPU:
        # The probe checks what the graph computes, not a device's arithmetic: on CUDA a row's
        # result moves in its low bits with the batch's size (TF32 matmuls, cuDNN's choice of
        # algorithm), which the probe's tolerance would mistake for sessions mixing.
        session = ort.InferenceSession(str(model_path), providers=[CPU])
    _probe(where, config, session)


def narrowed_to_graph(config: ModelConfig, session: ort.InferenceSession) -> ModelConfig:
    """``config`` with every input extent written -1 that the graph fixes replaced by the
    graph's (batch and time axes aside).

    -1 on such an axis means "as the graph has it" (a config may leave static extents to the
    graph): the checks of a step must then hold it to the graph's extent. Left at -1, a step
    of another extent passed them, joined a batch of steps it cannot be stacked with, and the
    whole batch failed INTERNAL; now it is refused INVALID_ARGUMENT, alone. What GetModel
    reports is the narrowed shape, the one a client must send.
    """
    graph = {i.name: i for i in session.get_inputs()}
    inputs = []
    for spec in config.inputs:
        shape = [
            g
            if c == -1
            and isinstance(g, int)
            and g > 0
            and axis not in (spec.batch_axis, spec.time_axis)
            else c
            for axis, (c, g) in enumerate(zip(spec.shape, graph[spec.name].shape, strict=True))
        ]
        inputs.append(spec if shape == spec.shape else spec.model_copy(update={"shape": shape}))
    if all(new is old for new, old in zip(inputs, config.inputs, strict=True)):
        return config
    return config.model_copy(update={"inputs": inputs})


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
    A dimension that is a batch axis in one place and a time axis in another is refused naming
    the odd one out: the time axis when more tensors take the dimension as their batch axis
    (an output whose axes were swapped), else the batch axis (an input's).
    """
    batch_names: dict[str, str] = {}
    time_names: dict[str, str] = {}
    uses: dict[tuple[str, str], int] = {}  # (dimension, role) -> tensors declaring it so
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
                uses[dim, role] = uses.get((dim, role), 0) + 1
    same = (
        "the batch axes of inputs, outputs and states must be the same graph dimension, "
        "and it is no tensor's time axis"
    )
    for dim, batch_field in batch_names.items():
        if dim not in time_names:
            continue
        time_field = time_names[dim]
        if uses[dim, "batch"] > uses[dim, "time"]:
            raise ConfigError(
                f"{where} {_axis_field(time_field, 'time')}: its time axis is the graph "
                f"dimension {dim!r}, which {batch_field} declares as its batch axis (and "
                f"{uses[dim, 'batch'] - 1} more tensors do); {same}"
            )
        raise ConfigError(
            f"{where} {_axis_field(batch_field, 'batch')}: its batch axis is the graph "
            f"dimension {dim!r}, which {time_field} declares as its time axis; {same}"
        )


def _axis_field(described: str, role: str) -> str:
    """``outputs[0] ('Y' axis 2)`` as ``outputs[0].time_axis ('Y' axis 2)``."""
    field, _, rest = described.partition(" ")
    return f"{field}.{role}_axis {rest}"


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
_RECURRENT_ROLES = {"h": "initial_h/Y_h", "c": "initial_c/Y_c"}


def _fed_role(node: onnx.NodeProto, slot: int, opset: int) -> str | None:
    """The state a node carries from its input ``slot`` to one of its outputs, or None.

    ``initial_h``/``initial_c`` of a recurrent node (``Y_h``/``Y_c``); the k-th state of a
    ``Scan`` (its k-th output; from opset 9 the states come first, in opset 8 after
    ``sequence_lens``); the k-th loop-carried value of a ``Loop`` (after ``M`` and ``cond``).
    """
    if node.op_type in _RECURRENT_SLOTS:
        return _RECURRENT_ROLES["h" if slot == 5 else "c"] if slot in (5, 6) else None
    if node.op_type == "Scan":
        first = 1 if opset < 9 else 0
        k = slot - first
        return f"Scan state {k}" if 0 <= k < _scan_states(node, opset) else None
    if node.op_type == "Loop":
        return f"Loop-carried value {slot - 2}" if slot >= 2 else None
    return None


def _made_role(node: onnx.NodeProto, slot: int, opset: int) -> str | None:
    """The state a node's output ``slot`` returns the next value of (see :func:`_fed_role`)."""
    if node.op_type in _RECURRENT_SLOTS:
        return _RECURRENT_ROLES["h" if slot == 1 else "c"] if slot in (1, 2) else None
    if node.op_type == "Scan":
        return f"Scan state {slot}" if slot < _scan_states(node, opset) else None
    if node.op_type == "Loop":
        return f"Loop-carried value {slot}" if slot < len(node.input) - 2 else None
    return None


def _scan_states(node: onnx.NodeProto, opset: int) -> int:
    scan_inputs = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
    return len(node.input) - scan_inputs - (1 if opset < 9 else 0)


def state_roles(
    graph: onnx.GraphProto, opset: int = 9
) -> tuple[dict[str, set[tuple[str, str]]], dict[str, set[tuple[str, str]]]]:
    """Which node state slots each graph input feeds and each graph output comes from.

    A role is ``(node, slot)``: a graph input reaching ``initial_h`` of an ``RNN``/``LSTM``/
    ``GRU`` node (input 5; ``initial_c`` is input 6), a graph output produced from ``Y_h``
    (output 1; ``Y_c`` is output 2), or the k-th state carried by a ``Scan`` or ``Loop``
    (a cell written by hand), followed through Split / Squeeze / Unsqueeze / Concat and the
    like of stacked layers. Used to check (and infer) state pairs by wiring. ``opset`` is the
    graph's (a ``Scan`` of opset 8 takes ``sequence_lens`` first).
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
            role = _fed_role(node, slot, opset)
            if role is not None:
                roles.add((node.name, role))
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
        role = _made_role(node, slot, opset)
        if role is not None:
            return {(node.name, role)}
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
    _check_directions(where, proto)
    _check_ranges(where, config, proto)
    ins, outs = state_roles(proto.graph, default_opset(proto))
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


def _check_ranges(where: str, config: ModelConfig, proto: onnx.ModelProto) -> None:
    """A declared ``range`` must stay within the table the input indexes: a range that lets
    -1 through (read as the last row, a wrong answer without an error) or one past the last
    row (a failed run) defeats what the range is for."""
    tables: dict[str, np.ndarray] | None = None
    for n, spec in enumerate(config.inputs):
        if spec.range is None:
            continue
        tables = tables if tables is not None else graph_constants(proto.graph)
        rows = index_range(proto.graph, spec.name, tables)
        if rows is not None and (spec.range[0] < rows[0] or spec.range[1] > rows[1]):
            raise ConfigError(
                f"{where} inputs[{n}].range: {list(spec.range)} reaches outside the table "
                f"{spec.name!r} indexes in the graph (rows {rows[0]}..{rows[1]}); "
                f"use range = {list(rows)} or narrower"
            )


def _check_directions(where: str, proto: onnx.ModelProto) -> None:
    """A recurrent node that runs backwards (``reverse``, ``bidirectional``) is refused: it
    reads the future of its chunk, so a session stepped a chunk at a time gets other outputs
    than its whole sequence, and its final state is the state of the chunk's start."""
    for node in proto.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        for attribute in node.attribute:
            if attribute.name == "direction":
                direction = attribute.s.decode()
                if direction != "forward":
                    raise ConfigError(
                        f"{where} states: node {node.name or node.op_type!r} ({node.op_type}) "
                        f"runs direction={direction!r}: it reads the future, so a session "
                        "cannot be stepped and carry its state; export the forward direction"
                    )


def _roles(roles: set[tuple[str, str]]) -> str:
    return ", ".join(f"{role} of node {node!r}" for node, role in sorted(roles))


def default_opset(proto: onnx.ModelProto) -> int:
    """The version of the default ONNX domain the model imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


#: Check runs: (sessions, timesteps), all four numbers distinct so a swapped or fixed axis
#: shows; every run is also split into single sessions.
PROBE_RUNS = ((3, 2), (2, 5))


def _probe_array(shape: list[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    from .config import DTYPES

    if dtype.startswith("int"):
        return rng.integers(0, 2, shape).astype(DTYPES[dtype])
    return (rng.standard_normal(shape) * 0.5).astype(DTYPES[dtype])


def _probe(where: str, config: ModelConfig, session: ort.InferenceSession) -> None:
    """Run the graph with 3 sessions of 2 timesteps and 2 of 5, then each session alone.

    The outputs must have as many rows on each declared batch axis as there are sessions and
    as many steps on each declared time axis as there were timesteps, every state output
    must come back in its input's shape, and each session's rows must be what it gets alone:
    that is what lets the server batch sessions without one session's data reaching another.
    Both runs are split: a graph that moves rows by an amount taken from the batch's size
    (row b gets row (b + 3) mod B) keeps a batch of 3 in place and mixes a batch of 2.
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

    runs: list[tuple[int, int, dict[str, np.ndarray], list[np.ndarray]]] = []
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
                    "time axis (omit time_axis if it has none), or the inputs' time_axis is "
                    "not the axis the graph steps over"
                )
        for n, s in enumerate(config.states):
            value = values[len(config.outputs) + n]
            if list(value.shape) != list(feeds[s.input].shape):
                raise ConfigError(
                    f"{where} states[{n}].output: {s.output!r} came back with shape "
                    f"{list(value.shape)} but {s.input!r} takes {list(feeds[s.input].shape)}; "
                    "a state output must be the next value of its own input"
                )
        runs.append((batch, steps, feeds, values))
    for batch, steps, feeds, together in runs:
        for row in range(batch):
            alone = {
                name: np.take(value, [row], axis=feed_axes[name]) for name, value in feeds.items()
            }
            for field, name, axis, mixed, single in zip(
                fields, names, batch_axes, together, run(alone, 1, steps), strict=True
            ):
                want = np.take(single, 0, axis=axis).astype(np.float64)
                got = np.take(mixed, row, axis=axis).astype(np.float64)
                scale = max(1.0, float(np.abs(want).max(initial=0.0)))
                if (
                    got.shape != want.shape
                    or float(np.abs(got - want).max(initial=0.0)) > 1e-4 * scale
                ):
                    raise ConfigError(
                        f"{where} {field}.batch_axis: session {row} of a batch of {batch} got "
                        f"other values of {name!r} than it gets alone: the declared batch axes "
                        "do not keep sessions apart (are the inputs' and states' batch_axis the "
                        "same graph dimension?)"
                    )


class Runner:
    """Runs one model version's ORT session on its own worker thread.

    ``device`` is where the session keeps tensors it is handed or returns on the device side
    (``"cuda"`` or ``"cpu"``): state rows are bound there, state outputs are left there.
    """

    def __init__(self, session: ort.InferenceSession, name: str) -> None:
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        self.placement: dict[str, str] = node_placement(session)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One blocking ``session.run``: host arrays in, host arrays out. The path of host
        slabs on CPU (measured faster there than binding each tensor, docs/server.md) and of
        Predict."""
        return self.session.run(output_names, feeds)

    def run_bound(
        self,
        host_feeds: dict[str, np.ndarray],
        device_feeds: dict[str, ort.OrtValue | np.ndarray],
        host_outputs: list[str],
        device_outputs: list[str],
    ) -> tuple[list[np.ndarray], list[ort.OrtValue]]:
        """One blocking run through IOBinding: ``host_outputs`` as host arrays,
        ``device_outputs`` as OrtValues on :attr:`device` (the path of device slabs).

        Host feeds are copied to the device by onnxruntime (once); device feeds are bound as
        they are. Host outputs are allocated by onnxruntime on the host; on CPU the array
        shares the OrtValue's memory, which stays alive as long as the array does.
        """
        binding = self.session.io_binding()
        for name, value in host_feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in device_feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in device_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        n = len(host_outputs)
        return [values[i].numpy() for i in range(n)], [values[i] for i in range(n, len(values))]

    def close(self) -> None:
        # Runs already queued (a Predict that started before the version was released)
        # still run and are answered; nothing new is taken.
        self.executor.shutdown(wait=False)
