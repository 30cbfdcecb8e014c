"""Export any PyTorch recurrent module into a model repository, with its config, parity-checked.

``export(module, example_inputs, repository, name)`` takes a module whose forward is
``forward(*inputs, state=None) -> (*outputs, state)`` — what ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU`` do, and what a custom streaming model does (``state`` a tensor or a tuple of
tensors; ``None`` means "start from zero") — and writes ``<repository>/<name>/<version>/
model.onnx`` and ``<repository>/<name>/config.toml``:

1. The axes are measured, not guessed: the module runs at two batch sizes and two lengths
   (2 × 5 and 3 × 7) and every output and state axis whose extent follows the batch size is
   its batch axis, the time length its time axis, anything else must stay fixed.
2. The graph comes from torch's TorchScript exporter (``dynamo=False``, which emits native
   ``RNN``/``LSTM``/``GRU`` nodes; torch 2.13's default exporter fails on LSTM/GRU with a dynamic
   time axis and unrolls ``nn.RNN`` wrongly), with the state as named inputs and outputs and
   dynamic ``batch``/``time`` dimensions. ``nn.LSTM(proj_size=...)``, which no torch exporter
   emits, becomes an ONNX ``Scan`` over one step of the projected cell.
3. Parity before success: onnxruntime on the whole sequence and step by step with the state
   carried, at several lengths and batch sizes, against the module in torch; then (``check=
   "server"``) a real rnnserve server on loopback is stepped one timestep per ``Step`` and
   must give torch's whole-sequence outputs and final state. Errors are measured relative to
   the magnitude of the values (``|got - want| / max(1, max |want|)``), since an LSTM's cell
   state can reach hundreds.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from .graph import STATES_KEY, cell_kind
from .network import SequenceModel
from .onnx_export import graph_names, to_onnx
from .projection import _projected
from .repository import _atomic_write, _tensors_of, next_version

OPSET = 17
#: Scaled error (``max |got - want| / max(1, max |want|)``) allowed between torch and ONNX.
TOLERANCE = 1e-5
_PROBES = ((2, 5), (3, 7))  # (batch, time) pairs: all four numbers distinct


class ExportError(ValueError):
    """The module cannot be exported as a servable model, or the export is not faithful."""


@dataclass(frozen=True)
class Axes:
    """A tensor's name, dtype, full shape (-1 for batch and time) and its batch/time axes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int
    time_axis: int = -1


@dataclass
class Exported:
    """What :func:`export` wrote and the parity it measured (scaled errors, by check)."""

    model_path: Path
    config_path: Path
    version: int
    kind: str
    parity: dict[str, float] = field(default_factory=dict)


_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
}


def _flatten(state: object) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], object]]:
    """The state's tensors in order, and how to rebuild its structure from them."""
    if isinstance(state, Tensor):
        return [state], lambda flat: flat[0]
    if isinstance(state, (tuple, list)) and all(isinstance(s, Tensor) for s in state):
        kind = type(state)
        return list(state), lambda flat: kind(flat)
    raise ExportError(
        "the module's state must be a tensor or a tuple of tensors "
        f"(got {type(state).__name__}); forward(*inputs, state) -> (*outputs, state)"
    )


def _split(result: object) -> tuple[list[Tensor], object]:
    if not isinstance(result, tuple) or len(result) < 2:
        raise ExportError(f"forward must return (*outputs, state); got {type(result).__name__}")
    outputs = list(result[:-1])
    if len(outputs) == 1 and isinstance(outputs[0], (tuple, list)):
        outputs = list(outputs[0])
    if not all(isinstance(o, Tensor) for o in outputs):
        raise ExportError("every output must be a tensor")
    return outputs, result[-1]


def _recurrent_layers(module: nn.Module) -> list[nn.RNNBase]:
    return [m for m in module.modules() if isinstance(m, nn.RNNBase)]


def _reads_batch_first(module: nn.Module) -> bool:
    """Whether the module reads (B, T, ...): a :class:`SequenceModel` says so itself (its
    peephole LSTM and paper GRU are no ``nn.RNNBase``), else the first recurrent layer."""
    if isinstance(module, SequenceModel):
        return module.batch_first
    layers = _recurrent_layers(module)
    return bool(layers and layers[0].batch_first)


def _resize(x: Tensor, batch_axis: int, time_axis: int, batch: int, time: int, seed: int) -> Tensor:
    """An input like ``x`` with another batch size and length (random values, same kind)."""
    shape = list(x.shape)
    shape[batch_axis] = batch
    if time_axis >= 0:
        shape[time_axis] = time
    generator = torch.Generator().manual_seed(seed)
    if x.dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=x.dtype)
    high = max(int(x.max()) + 1, 2) if x.numel() else 2
    return torch.randint(0, high, shape, generator=generator, dtype=x.dtype)


def _measure(extents: list[tuple[int, ...]], label: str, dynamic_time: bool) -> tuple[int, int]:
    """Batch and time axes of a tensor from its shapes at the probe sizes."""
    (b1, t1), (b2, t2) = _PROBES
    ranks = {len(e) for e in extents}
    if len(ranks) != 1:
        raise ExportError(f"{label}: its rank changes with the batch size or length")
    batch = time = -1
    for axis, (e1, e2) in enumerate(zip(*extents, strict=True)):
        if (e1, e2) == (b1, b2) and batch == -1:
            batch = axis
        elif (e1, e2) == (t1, t2) and time == -1 and dynamic_time:
            time = axis
        elif e1 != e2:
            raise ExportError(
                f"{label}: axis {axis} is {e1} for {b1} sequences of {t1} steps and {e2} for "
                f"{b2} of {t2}: only a batch axis and a time axis may vary"
            )
    if batch == -1:
        raise ExportError(f"{label}: no axis follows the batch size, so sessions cannot share runs")
    return batch, time


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _keeps_training_modes(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """The module (its first argument) ends in the train/eval modes it came in, whatever
    happens: exporting runs it in eval mode, and a caller's training loop must not find its
    dropout switched off (or on) by an export."""

    @functools.wraps(fn)
    def keeping(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        module = args[0]
        assert isinstance(module, nn.Module)
        modes = [(m, m.training) for m in module.modules()]
        try:
            return fn(*args, **kwargs)
        finally:
            for m, training in modes:
                m.training = training

    return keeping


@_keeps_training_modes
def export(
    module: nn.Module,
    example_inputs: Tensor | Sequence[Tensor],
    repository: Path | str,
    name: str,
    *,
    batch_first: bool | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    state_names: Sequence[tuple[str, str]] | None = None,
    version: int | None = None,
    kind: str | None = None,
    description: str = "",
    metadata: Mapping[str, str] | None = None,
    limits: Mapping[str, object] | None = None,
    check: str = "server",
    tolerance: float = TOLERANCE,
) -> Exported:
    """Export ``module`` to ``<repository>/<name>/<version>/model.onnx`` + ``config.toml``.

    ``example_inputs``: the non-state inputs (a tensor or a tuple), batch and time axes where
    ``batch_first`` says (default: the ``batch_first`` of the module's first recurrent layer,
    else time-first). ``state_names``: (input, output) graph names of each state tensor
    (default ``initial_h``/``Y_h`` and ``initial_c``/``Y_c`` for a bare ``nn.LSTM``-like state,
    else ``state{k}``/``state{k}_next``). ``check``: ``"server"`` (onnxruntime, then a real
    server stepped one timestep per call), ``"onnxruntime"`` or ``"none"``. Raises
    :class:`ExportError` when the module cannot be served or parity fails; nothing is written
    into the repository then.
    """
    if not name or "/" in name or name.startswith("."):
        raise ExportError(f"model name {name!r}: use a plain folder name")
    if check not in ("server", "onnxruntime", "none"):
        raise ExportError(f"check {check!r}: server, onnxruntime or none")
    module = module.eval()
    inputs = [example_inputs] if isinstance(example_inputs, Tensor) else list(example_inputs)
    layers = _recurrent_layers(module)
    if any(layer.bidirectional for layer in layers):
        raise ExportError("a bidirectional layer reads the future, so it cannot be stepped")
    if batch_first is None:
        batch_first = _reads_batch_first(module)
    elif isinstance(module, SequenceModel) and batch_first != module.batch_first:
        raise ExportError(
            f"batch_first={batch_first}, but the SequenceModel was built with batch_first="
            f"{module.batch_first}: its graph reads its inputs as the module does"
        )
    in_batch, in_time = (0, 1) if batch_first else (1, 0)
    for k, x in enumerate(inputs):
        if x.ndim < 2:
            raise ExportError(f"input {k} has rank {x.ndim}: inputs need a batch and a time axis")

    # 1. Measure the axes of outputs and state at two batch sizes and lengths.
    runs = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        for seed, (b, t) in enumerate(_PROBES):
            probe = [_resize(x, in_batch, in_time, b, t, seed) for x in inputs]
            outputs, state = _split(module(*probe))
            flat, rebuild = _flatten(state)
            runs.append((outputs, flat))
    n_out, n_state = len(runs[0][0]), len(runs[0][1])
    if n_state == 0:
        raise ExportError("the module returned no state to carry")

    if isinstance(module, SequenceModel):  # the hand-built graph's names (onnx_export.py)
        names = graph_names(module, (output_names or ["y"])[0])
        input_names = input_names or [names.input]
        output_names = output_names or [names.output]
        state_names = state_names or list(names.state_pairs)
        kind = kind or module.spec.kind
        metadata = {**module.spec.metadata, **(metadata or {})}
    in_names = list(
        input_names or (["x"] if len(inputs) == 1 else [f"x{k}" for k in range(len(inputs))])
    )
    out_names = list(output_names or (["y"] if n_out == 1 else [f"y{k}" for k in range(n_out)]))
    if state_names is None:
        if n_state <= 2 and isinstance(module, nn.RNNBase):
            state_names = [("initial_h", "Y_h"), ("initial_c", "Y_c")][:n_state]
        else:
            state_names = [(f"state{k}", f"state{k}_next") for k in range(n_state)]
    state_names = [tuple(p) for p in state_names]  # type: ignore[misc]
    if len(in_names) != len(inputs) or len(out_names) != n_out or len(state_names) != n_state:
        raise ExportError(
            f"names: {len(inputs)} inputs, {n_out} outputs and {n_state} state tensors to name"
        )

    def shape_of(t: Tensor, batch: int, time: int) -> tuple[int, ...]:
        return tuple(-1 if a in (batch, time) else e for a, e in enumerate(t.shape))

    input_axes = [
        Axes(n, _dtype(x), shape_of(x, in_batch, in_time), in_batch, in_time)
        for n, x in zip(in_names, inputs, strict=True)
    ]
    output_axes = []
    for k, n in enumerate(out_names):
        batch, time = _measure([tuple(r[0][k].shape) for r in runs], f"output {n!r}", True)
        output_axes.append(
            Axes(n, _dtype(runs[0][0][k]), shape_of(runs[0][0][k], batch, time), batch, time)
        )
    state_axes = []
    for k, (state_in, _) in enumerate(state_names):
        batch, _ = _measure([tuple(r[1][k].shape) for r in runs], f"state {state_in!r}", False)
        t = runs[0][1][k]
        state_axes.append(Axes(state_in, _dtype(t), shape_of(t, batch, -1), batch))

    # 2. The ONNX graph.
    proto = _to_onnx(
        module, inputs, rebuild, input_axes, output_axes, state_axes, state_names, in_batch
    )
    if kind is None:
        kind = (
            "lstm_projected"
            if any(_projected(m) for m in module.modules())
            else cell_kind(proto.graph)
        )
    text = _config_text(
        kind,
        description,
        input_axes,
        output_axes,
        state_axes,
        state_names,
        metadata,
        limits,
        _input_ranges(proto),
    )

    # 3. Parity, then write.
    model_dir = Path(repository) / name
    number = next_version(model_dir) if version is None else version
    if number < 1:
        raise ExportError(f"version {number}: versions are positive integers")
    config_path = model_dir / "config.toml"
    others = (
        [p for p in model_dir.iterdir() if p.name.isdigit() and p.name != str(number)]
        if model_dir.is_dir()
        else []
    )
    if (
        others
        and config_path.exists()
        and _tensors_of(config_path.read_text(encoding="utf-8")) != _tensors_of(text)
    ):
        raise ExportError(
            f"{config_path}: versions {sorted(p.name for p in others)} declare other tensors "
            "than this model; export it under a new model name"
        )
    parity: dict[str, float] = {}
    if check != "none":
        try:
            found = _onnxruntime_parity(
                module,
                proto,
                inputs,
                rebuild,
                input_axes,
                output_axes,
                state_axes,
                state_names,
                tolerance,
            )
        except ExportError:
            raise
        except Exception as exc:  # onnxruntime's own errors: the graph it cannot run
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"onnxruntime cannot run the exported graph: {first}") from None
        parity.update(found)
    if check == "server":
        parity.update(
            _server_parity(
                module,
                proto,
                text,
                name,
                inputs,
                rebuild,
                input_axes,
                output_axes,
                state_axes,
                state_names,
                tolerance,
            )
        )
    version_dir = model_dir / str(number)
    version_dir.mkdir(parents=True, exist_ok=True)
    model_path = version_dir / "model.onnx"
    _atomic_write(model_path, proto.SerializeToString())
    _atomic_write(config_path, text.encode("utf-8"))
    return Exported(model_path, config_path, number, kind, parity)


def _dtype(t: Tensor) -> str:
    if t.dtype not in _DTYPE_NAMES:
        raise ExportError(f"dtype {t.dtype} is not one the server carries")
    return _DTYPE_NAMES[t.dtype]


class _Flat(nn.Module):
    """``forward(*inputs, *state) -> (*outputs, *state)``: the shape of the ONNX graph."""

    def __init__(
        self, module: nn.Module, n_inputs: int, rebuild: Callable[[Sequence[Tensor]], object]
    ) -> None:
        super().__init__()
        self.module = module
        self.n_inputs = n_inputs
        self.rebuild = rebuild

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        inputs, state = args[: self.n_inputs], args[self.n_inputs :]
        outputs, new_state = _split(self.module(*inputs, self.rebuild(list(state))))
        return (*outputs, *_flatten(new_state)[0])


def _zero_state(state_axes: list[Axes], batch: int) -> list[Tensor]:
    dtypes = {v: k for k, v in _DTYPE_NAMES.items()}
    return [
        torch.zeros(
            [batch if a == s.batch_axis else e for a, e in enumerate(s.shape)],
            dtype=dtypes[s.dtype],
        )
        for s in state_axes
    ]


def _to_onnx(
    module: nn.Module,
    inputs: list[Tensor],
    rebuild: Callable[[Sequence[Tensor]], object],
    input_axes: list[Axes],
    output_axes: list[Axes],
    state_axes: list[Axes],
    state_names: list[tuple[str, str]],
    in_batch: int,
) -> onnx.ModelProto:
    from .projection import exportable

    if isinstance(module, SequenceModel):
        # The paper's cells (peephole LSTM, reset-before GRU) have no torch exporter: the
        # graph is built from the weights (onnx_export.py), then checked like any other.
        proto = to_onnx(module, output_name=output_axes[0].name)
        return _finish(proto, module, state_names)
    batch = inputs[0].shape[in_batch]
    args = (*inputs, *_zero_state(state_axes, batch))
    dynamic: dict[str, dict[int, str]] = {}
    for a in [*input_axes, *output_axes]:
        dynamic[a.name] = {
            a.batch_axis: "batch",
            **({a.time_axis: "time"} if a.time_axis >= 0 else {}),
        }
    for a, (_, state_out) in zip(state_axes, state_names, strict=True):
        dynamic[a.name] = {a.batch_axis: "batch"}
        dynamic[state_out] = {a.batch_axis: "batch"}
    buffer = io.BytesIO()
    with exportable(module) as ready, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and trace notes
        torch.onnx.export(
            _Flat(ready, len(inputs), rebuild).eval(),  # eval: dropout off, and kept off
            args,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[a.name for a in input_axes] + [s for s, _ in state_names],
            output_names=[a.name for a in output_axes] + [o for _, o in state_names],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    from .projection import expand_scans

    return _finish(expand_scans(onnx.load_from_string(buffer.getvalue())), module, state_names)


def _finish(
    proto: onnx.ModelProto, module: nn.Module, state_names: list[tuple[str, str]]
) -> onnx.ModelProto:
    """Name the graph, record the state pairs for `rnnserve config infer`, check it."""
    proto.graph.name = f"rnnserve_{type(module).__name__}"
    entry = proto.metadata_props.add()
    entry.key, entry.value = STATES_KEY, json.dumps([list(p) for p in state_names])
    onnx.checker.check_model(proto, full_check=True)
    return proto


def scaled_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max(1, max |want|)``: absolute near zero, relative when large."""
    want = np.asarray(want, np.float64)
    if np.shape(got) != want.shape:
        return float("inf")
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    return float(np.abs(np.asarray(got, np.float64) - want).max(initial=0.0)) / scale


def _torch_run(
    module: nn.Module, inputs: list[Tensor], state: list[Tensor], rebuild: Callable
) -> list[np.ndarray]:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LSTM with projections is not supported")
        outputs, new_state = _split(module(*inputs, rebuild(state)))
    return [t.numpy() for t in [*outputs, *_flatten(new_state)[0]]]


def _onnxruntime_parity(
    module: nn.Module,
    proto: onnx.ModelProto,
    inputs: list[Tensor],
    rebuild: Callable,
    input_axes: list[Axes],
    output_axes: list[Axes],
    state_axes: list[Axes],
    state_names: list[tuple[str, str]],
    tolerance: float,
) -> dict[str, float]:
    """Whole sequence and one step at a time, T = 1, 6, 33 and B = 1, 4, from a random state."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = {"onnxruntime whole sequence": 0.0, "onnxruntime stepwise": 0.0}
    for seed, (b, t) in enumerate(((1, 1), (4, 6), (1, 33), (4, 33))):
        xs = [
            _resize(x, a.batch_axis, a.time_axis, b, t, seed + 10)
            for x, a in zip(inputs, input_axes, strict=True)
        ]
        generator = torch.Generator().manual_seed(seed)
        state = [
            (torch.randn(z.shape, generator=generator) * 0.5).to(z.dtype)
            for z in _zero_state(state_axes, b)
        ]
        want = _torch_run(module, xs, state, rebuild)
        feeds = {a.name: x.numpy() for a, x in zip(input_axes, xs, strict=True)}
        feeds.update({s: v.numpy() for (s, _), v in zip(state_names, state, strict=True)})
        got = session.run(names, feeds)
        error = max(scaled_error(g, w) for g, w in zip(got, want, strict=True))
        worst["onnxruntime whole sequence"] = max(worst["onnxruntime whole sequence"], error)
        # One timestep per run, the state outputs fed back as the next run's state inputs.
        carried = {s: v.numpy() for (s, _), v in zip(state_names, state, strict=True)}
        steps: list[list[np.ndarray]] = []
        for step in range(t):
            one = {
                a.name: np.take(x.numpy(), [step], axis=a.time_axis)
                for a, x in zip(input_axes, xs, strict=True)
            }
            values = session.run(names, {**one, **carried})
            steps.append(values[: len(names) - len(state_names)])
            carried = {
                s: v for (s, _), v in zip(state_names, values[len(steps[-1]) :], strict=True)
            }
        n_out = len(names) - len(state_names)
        out_axes = [a.time_axis for a in output_axes]
        stepped = [
            np.concatenate([s[k] for s in steps], axis=out_axes[k])
            if out_axes[k] >= 0
            else steps[-1][k]
            for k in range(n_out)
        ]
        stepped += list(carried.values())
        error = max(scaled_error(g, w) for g, w in zip(stepped, want, strict=True))
        worst["onnxruntime stepwise"] = max(worst["onnxruntime stepwise"], error)
    for check, error in worst.items():
        if not error <= tolerance:
            raise ExportError(
                f"{check}: scaled error {error:.2e} against torch exceeds {tolerance:.0e}"
            )
    return worst


def _server_parity(
    module: nn.Module,
    proto: onnx.ModelProto,
    text: str,
    name: str,
    inputs: list[Tensor],
    rebuild: Callable,
    input_axes: list[Axes],
    output_axes: list[Axes],
    state_axes: list[Axes],
    state_names: list[tuple[str, str]],
    tolerance: float,
) -> dict[str, float]:
    """A real server on loopback, one ``Step`` per timestep, against torch's whole sequence."""
    from rnnserve.client import Client

    steps = 24
    xs = [
        _resize(x, a.batch_axis, a.time_axis, 1, steps, 99)
        for x, a in zip(inputs, input_axes, strict=True)
    ]
    want = _torch_run(module, xs, _zero_state(state_axes, 1), rebuild)
    # Per-session arrays: the batch axis removed, as a client sends them.
    session_xs = [
        (a, np.take(x.numpy(), 0, axis=a.batch_axis)) for x, a in zip(xs, input_axes, strict=True)
    ]
    staging = Path(tempfile.mkdtemp(prefix="rnnserve-export-"))
    try:
        (staging / name / "1").mkdir(parents=True)
        (staging / name / "1" / "model.onnx").write_bytes(proto.SerializeToString())
        (staging / name / "config.toml").write_text(text, encoding="utf-8")
        with _served(staging) as address, Client(address) as client:
            with client.open_session(name) as session:
                got: list[list[np.ndarray]] = [[] for _ in output_axes]
                for t in range(steps):
                    one = {
                        a.name: np.take(x, [t], axis=_session_axis(a.time_axis, a.batch_axis))
                        for a, x in session_xs
                    }
                    reply = session.step(**one)
                    replies = reply if isinstance(reply, dict) else {output_axes[0].name: reply}
                    for k, a in enumerate(output_axes):
                        got[k].append(np.asarray(replies[a.name]))
                final = session.export_state().state
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    errors = {}
    for k, a in enumerate(output_axes):
        axis = _session_axis(a.time_axis, a.batch_axis)
        value = np.concatenate(got[k], axis=axis) if a.time_axis >= 0 else got[k][-1]
        errors[a.name] = scaled_error(value, np.take(want[k], 0, axis=a.batch_axis))
    for k, (a, (state_in, _)) in enumerate(zip(state_axes, state_names, strict=True)):
        want_state = np.take(want[len(output_axes) + k], 0, axis=a.batch_axis)
        errors[state_in] = scaled_error(np.asarray(final[state_in]), want_state)
    worst = max(errors.values())
    if not worst <= tolerance:
        raise ExportError(
            f"server stepwise vs torch whole sequence: scaled errors {errors} exceed "
            f"{tolerance:.0e}"
        )
    return {"server stepwise": worst}


@contextmanager
def _served(repository: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """``rnnserve serve`` of ``repository`` on a free loopback port; its address."""
    port_file = repository / ".ports.json"
    command = [
        sys.executable, "-m", "rnnserve.server", "serve", "--repository", str(repository),
        "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
        "--port-file", str(port_file), "--log-level", "WARNING",
    ]  # fmt: skip
    log = repository / ".server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ExportError(
                    "the check server did not start: "
                    + log.read_text(encoding="utf-8", errors="replace")[-2000:]
                )
            time.sleep(0.05)
        yield f"127.0.0.1:{json.loads(port_file.read_text(encoding='utf-8'))['grpc_port']}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def _session_axis(axis: int, batch_axis: int) -> int:
    """An axis index once the batch axis is removed."""
    return axis - 1 if axis > batch_axis else axis


def _input_ranges(proto: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """The value range of each integer input that indexes a table (an embedding's token
    ids), read from the graph as ``rnnserve config infer`` reads it."""
    from .graph import index_range

    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    integer = {onnx.TensorProto.INT32, onnx.TensorProto.INT64}
    ranges: dict[str, tuple[int, int]] = {}
    for value in graph.input:
        if value.name in constants or value.type.tensor_type.elem_type not in integer:
            continue
        bounds = index_range(graph, value.name)
        if bounds is not None:
            ranges[value.name] = bounds
    return ranges


def _config_text(
    kind: str,
    description: str,
    input_axes: list[Axes],
    output_axes: list[Axes],
    state_axes: list[Axes],
    state_names: list[tuple[str, str]],
    metadata: Mapping[str, str] | None,
    limits: Mapping[str, object] | None,
    ranges: Mapping[str, tuple[int, int]] | None = None,
) -> str:
    import tomllib

    lines = [
        f"cell_kind = {json.dumps(kind)}",
        f"description = {json.dumps(description)}",
    ]
    for table, axes in (("inputs", input_axes), ("outputs", output_axes)):
        for a in axes:
            lines += [
                "",
                f"[[{table}]]",
                f"name = {json.dumps(a.name)}",
                f"dtype = {json.dumps(a.dtype)}",
                f"shape = {json.dumps(list(a.shape))}",
                f"batch_axis = {a.batch_axis}",
            ]
            if a.time_axis >= 0:
                lines.append(f"time_axis = {a.time_axis}")
            if table == "inputs" and ranges and a.name in ranges:
                lines.append(f"range = {json.dumps(list(ranges[a.name]))}")
    for a, (state_in, state_out) in zip(state_axes, state_names, strict=True):
        lines += [
            "",
            "[[states]]",
            f"input = {json.dumps(state_in)}",
            f"output = {json.dumps(state_out)}",
            f"dtype = {json.dumps(a.dtype)}",
            f"shape = {json.dumps(list(a.shape))}",
            f"batch_axis = {a.batch_axis}",
        ]
    if limits:
        lines += ["", "[limits]", *(f"{k} = {json.dumps(v)}" for k, v in limits.items())]
    if metadata:
        lines += [
            "",
            "[metadata]",
            *(f"{json.dumps(k)} = {json.dumps(str(v))}" for k, v in metadata.items()),
        ]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)
    return text
