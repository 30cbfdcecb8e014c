"""Read a recurrent ONNX graph, write the config.toml that serves it (`rnnserve config infer`).

What the server needs and where it comes from:

- **State pairs** from the wiring of ``RNN`` / ``LSTM`` / ``GRU`` nodes: a graph input that
  reaches a node's ``initial_h`` (``initial_c``) pairs with the graph output that comes from
  the same nodes' ``Y_h`` (``Y_c``), through the Split / Squeeze / Unsqueeze / Concat of
  stacked layers (:func:`rnnserve.server.runtime.state_roles`, the check the server makes at
  load). State that no recurrent node carries (a convolution's last frames, say) is read from
  the ``rnnserve.states`` metadata that ``rnnserve export`` writes; otherwise the user is told
  which field to fill.
- **Batch and time axes** from the nodes' semantics: ``X`` is (T, B, F) and ``Y`` (T, D, B, H)
  with ``layout = 0``, (B, T, F) and (B, T, D, H) with ``layout = 1``, the state (D, B, H) or
  (B, D, H). These axes are followed through the graph (Transpose, Squeeze/Unsqueeze, Gather of
  an embedding, MatMul, Concat, Conv, element-wise ops …) to the graph's inputs and outputs,
  and named dimensions (``dim_param``) join the axes that share a name. A batch or time axis
  must be dynamic in the graph, so a fixed axis never gets either role.

Where the graph does not say, the written config leaves the field empty (``""`` or ``-1``,
which the server refuses with the field's name) and :attr:`Inferred.todo` says what to fill.
Needs onnx only (no torch, no onnxruntime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from rnnserve.server.graph_tables import attribute as _attr
from rnnserve.server.graph_tables import graph_constants as _constants
from rnnserve.server.graph_tables import index_range

_RECURRENT = ("RNN", "LSTM", "GRU")
_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
}
_SAME_SHAPE = {
    "Identity", "Cast", "Relu", "Tanh", "Sigmoid", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Dropout", "Softmax", "LogSoftmax", "Clip", "LeakyRelu", "Elu", "Selu", "Erf", "Gelu",
    "HardSigmoid", "HardSwish", "Softplus", "Softsign", "Not", "Sign", "Floor", "Ceil", "Round",
    "Reciprocal", "CastLike", "LayerNormalization", "InstanceNormalization",
    "BatchNormalization",
}  # fmt: skip
_BROADCAST = {
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum", "Mean", "Equal", "Greater",
    "Less", "And", "Or", "PRelu", "Mod",
}  # fmt: skip

#: metadata_props key under which ``rnnserve export`` records its state pairs (JSON list).
STATES_KEY = "rnnserve.states"


@dataclass
class Inferred:
    """A config.toml text and the fields a user must still fill (empty: ready to serve)."""

    text: str
    todo: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Axes:
    """Union-find over (tensor name, axis): axes that are the same dimension of the data."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, key: tuple[str, int]) -> tuple[str, int]:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def join(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        self.parent[self.find(a)] = self.find(b)


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return []
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
    ]


def _axes_list(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "axes":
            return list(helper.get_attribute_value(attr))
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(a) for a in np.atleast_1d(constants[node.input[1]])]
    return None


def _link(axes: _Axes, node: onnx.NodeProto, rank: dict[str, int], constants: dict) -> None:
    """Join the axes of ``node``'s inputs and outputs that are the same dimension."""
    op = node.op_type
    ins = [i for i in node.input]
    outs = list(node.output)
    if not outs or outs[0] not in rank:
        return
    out, ro = outs[0], rank[outs[0]]

    def live(name: str) -> bool:
        return bool(name) and name in rank and name not in constants

    if op in _SAME_SHAPE and ins and live(ins[0]):
        for i in range(min(rank[ins[0]], ro)):
            axes.join((ins[0], i), (out, i))
    elif op in _BROADCAST:
        for name in ins:
            if live(name):
                for i in range(rank[name]):
                    axes.join((name, i), (out, ro - rank[name] + i))
    elif op == "Slice" and live(ins[0]):
        # Sliced axes change extent: they are no longer the same dimension (k-1 frames of T).
        listed = (
            [int(a) for a in constants[ins[3]]] if len(ins) > 3 and ins[3] in constants else None
        )
        if listed is None and len(ins) > 3 and ins[3]:
            return
        if listed is None:
            starts = constants.get(ins[1])
            if starts is None:
                return
            listed = list(range(len(starts)))
        sliced = {a % ro for a in listed}
        for i in range(ro):
            if i not in sliced:
                axes.join((ins[0], i), (out, i))
    elif op == "Transpose" and live(ins[0]):
        perm = _attr(node, "perm", list(reversed(range(ro))))
        for i, p in enumerate(perm):  # type: ignore[arg-type]
            axes.join((ins[0], int(p)), (out, i))
    elif op in ("Squeeze", "Unsqueeze") and live(ins[0]):
        listed = _axes_list(node, constants)
        ri = rank[ins[0]]
        if listed is None:
            return
        if op == "Squeeze":
            gone = {a % ri for a in listed}
            kept = [i for i in range(ri) if i not in gone]
            for o, i in enumerate(kept):
                axes.join((ins[0], i), (out, o))
        else:
            added = {a % ro for a in listed}
            kept = [o for o in range(ro) if o not in added]
            for i, o in enumerate(kept):
                axes.join((ins[0], i), (out, o))
    elif op == "Concat":
        for name in ins:
            if live(name):
                for i in range(min(rank[name], ro)):
                    axes.join((name, i), (out, i))
    elif op == "Split" and live(ins[0]):
        for name in outs:
            if name in rank:
                for i in range(rank[name]):
                    axes.join((ins[0], i), (name, i))
    elif op == "Gather":
        data, indices = ins[0], ins[1]
        axis = int(_attr(node, "axis", 0))  # type: ignore[arg-type]
        rd = rank.get(data, 0)
        axis %= max(rd, 1)
        if live(data):
            for i in range(rd):
                if i < axis:
                    axes.join((data, i), (out, i))
                elif i > axis:
                    axes.join((data, i), (out, i - 1 + rank.get(indices, 0)))
        if live(indices):
            for j in range(rank[indices]):
                axes.join((indices, j), (out, axis + j))
    elif op == "MatMul":
        for name, keep in ((ins[0], rank.get(ins[0], 0) - 1), (ins[1], rank.get(ins[1], 0) - 2)):
            if live(name):
                for i in range(keep):
                    axes.join((name, i), (out, ro - rank[name] + i))
    elif op == "Gemm" and live(ins[0]) and not _attr(node, "transA", 0):
        axes.join((ins[0], 0), (out, 0))
    elif op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool") and live(ins[0]):
        for i in [0, *range(2, ro)]:
            axes.join((ins[0], i), (out, i))


def _recurrent_roles(node: onnx.NodeProto) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(batch axes, time axes) of a recurrent node's inputs and outputs, by its layout."""
    layout = int(_attr(node, "layout", 0))  # type: ignore[arg-type]
    ins = list(node.input) + [""] * 8
    outs = list(node.output) + [""] * 3
    if layout == 0:
        batch = [(ins[0], 1), (ins[5], 1), (ins[6], 1), (outs[0], 2), (outs[1], 1), (outs[2], 1)]
        time = [(ins[0], 0), (outs[0], 0)]
    else:
        batch = [(ins[0], 0), (ins[5], 0), (ins[6], 0), (outs[0], 0), (outs[1], 0), (outs[2], 0)]
        time = [(ins[0], 1), (outs[0], 1)]
    return [b for b in batch if b[0]], [t for t in time if t[0]]


def cell_kind(graph: onnx.GraphProto) -> str:
    """A label from the recurrent nodes (``cell_kind`` is free text to the server)."""
    kinds = []
    for node in graph.node:
        if node.op_type == "LSTM":
            peephole = len(node.input) > 7 and bool(node.input[7])
            kind = "peephole_lstm" if peephole else "lstm"
        elif node.op_type == "GRU":
            kind = "gru_torch" if _attr(node, "linear_before_reset", 0) else "gru"
        elif node.op_type == "RNN":
            kind = "rnn"
        else:
            continue
        if kind not in kinds:
            kinds.append(kind)
    return "+".join(kinds) if kinds else "custom"


_INTEGER = ("int32", "int64")


def _toml(value: object) -> str:
    return json.dumps(value)


def infer_config(model: onnx.ModelProto | Path | str, *, description: str = "") -> Inferred:
    """The config.toml that serves ``model``, and what a user must still fill in."""
    from rnnserve.server.runtime import default_opset, state_roles

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    try:
        shaped = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # a graph shape inference cannot follow: fall back to the declared shapes
        shaped = proto
    graph = shaped.graph
    constants = _constants(graph)
    inputs = [i for i in graph.input if i.name not in constants]
    values = [*graph.input, *graph.value_info, *graph.output]
    rank = {v.name: len(_dims(v)) for v in values if _dims(v)}
    rank.update({name: value.ndim for name, value in constants.items()})
    for node in graph.node:  # recurrent outputs whose shape inference left no value_info
        if node.op_type in _RECURRENT:
            for slot, name in enumerate(node.output):
                if name and name not in rank:
                    rank[name] = 4 if slot == 0 else 3

    axes = _Axes()
    for node in graph.node:
        _link(axes, node, rank, constants)
    named: dict[str, tuple[str, int]] = {}
    for value in values:
        for i, dim in enumerate(_dims(value)):
            if isinstance(dim, str):
                if dim in named:
                    axes.join((value.name, i), named[dim])
                else:
                    named[dim] = (value.name, i)
    batch_roots, time_roots = set(), set()
    for node in graph.node:
        if node.op_type in _RECURRENT:
            batch, time = _recurrent_roles(node)
            batch_roots |= {axes.find(b) for b in batch}
            time_roots |= {axes.find(t) for t in time}

    result = Inferred("")
    if not batch_roots:
        result.notes.append(
            "the graph has no RNN/LSTM/GRU node: batch and time axes come from named "
            "dimensions only"
        )
        for dim in named:
            if dim.lower() in ("batch", "batch_size", "n", "b"):
                batch_roots.add(axes.find(named[dim]))
            if dim.lower() in ("time", "seq", "seq_len", "sequence", "t"):
                time_roots.add(axes.find(named[dim]))

    def role_axes(value: onnx.ValueInfoProto) -> tuple[list[int], list[int]]:
        dims = _dims(value)
        batch = [
            i
            for i, d in enumerate(dims)
            if not isinstance(d, int) and axes.find((value.name, i)) in batch_roots
        ]
        time = [
            i
            for i, d in enumerate(dims)
            if not isinstance(d, int) and axes.find((value.name, i)) in time_roots
        ]
        return batch, time

    # State pairs: by wiring of the recurrent nodes, then by rnnserve export's metadata.
    fed, made = state_roles(proto.graph, default_opset(proto))
    pairs: list[tuple[str, str | None]] = []
    by_roles = {frozenset(r): name for name, r in made.items()}
    for value in inputs:
        roles = fed.get(value.name)
        if roles:
            pairs.append((value.name, by_roles.get(frozenset(roles))))
    recorded = {p.key: p.value for p in proto.metadata_props}
    for state_in, state_out in json.loads(recorded.get(STATES_KEY, "[]")):
        if state_in not in [p[0] for p in pairs]:
            pairs.append((state_in, state_out))
    paired_in = {p[0] for p in pairs}
    paired_out = {p[1] for p in pairs if p[1]}
    asked: dict[str, list[str]] = {}  # state inputs without an output: candidate outputs
    for value in inputs:  # state-like inputs nobody accounts for: ask
        batch, time = role_axes(value)
        if value.name in paired_in or time:
            continue
        candidates = [
            o.name for o in graph.output
            if o.name not in paired_out and _compatible(_dims(o), _dims(value))
        ]  # fmt: skip
        if candidates or not batch:
            pairs.append((value.name, None))
            paired_in.add(value.name)
            asked[value.name] = candidates
    # A lone candidate is left out of [[outputs]]: it is the state output to name.
    held_back = {c[0] for c in asked.values() if len(c) == 1}

    lines = [
        f"# written by `rnnserve config infer` from the graph {proto.graph.name!r}",
        f"cell_kind = {_toml(cell_kind(graph))}",
        f"description = {_toml(description or 'inferred from the ONNX graph')}",
    ]
    by_name = {v.name: v for v in values}

    def tensor_lines(kind: str, n: int, value: onnx.ValueInfoProto, with_time: bool) -> list[str]:
        dims = _dims(value)
        batch, time = role_axes(value)
        dtype = _DTYPES.get(value.type.tensor_type.elem_type)
        out = ["", f"[[{kind}]]", f"name = {_toml(value.name)}", f"dtype = {_toml(dtype or '')}"]
        if dtype is None:
            result.todo.append(f"{kind}[{n}].dtype: {value.name!r} has a type the server lacks")
        out.append(f"shape = {_toml([d if isinstance(d, int) else -1 for d in dims])}")
        if len(batch) == 1:
            out.append(f"batch_axis = {batch[0]}")
        else:
            out.append("batch_axis = -1  # FILL")
            result.todo.append(
                f"{kind}[{n}].batch_axis: the graph does not say which axis of {value.name!r} "
                f"(shape {_shape(dims)}) holds the sessions"
                + (f" (candidates {batch})" if batch else "")
            )
        if with_time and len(time) == 1 and time[0] not in batch:
            out.append(f"time_axis = {time[0]}")
        elif with_time and len(time) > 1:
            # Not -1: that is a valid "no time axis", which the server would accept as it is.
            out.append('time_axis = "FILL"  # one of the axes above, or -1 for none')
            result.todo.append(
                f"{kind}[{n}].time_axis: {value.name!r} has several axes that could be time "
                f"({time})"
            )
        return out

    n_in = 0
    for value in inputs:
        if value.name in paired_in:
            continue
        lines += tensor_lines("inputs", n_in, value, True)
        bounds = index_range(graph, value.name, constants)
        if bounds is not None and _DTYPES.get(value.type.tensor_type.elem_type) in _INTEGER:
            lines.append(f"range = {_toml(list(bounds))}")
            result.notes.append(
                f"inputs[{n_in}].range: {value.name!r} indexes a table of {bounds[1] + 1} rows "
                f"(a Gather), so values outside 0..{bounds[1]} are refused"
            )
        n_in += 1
    n_out = 0
    for value in graph.output:
        if value.name in paired_out or value.name in held_back:
            continue
        if made.get(value.name):
            result.notes.append(
                f"{value.name!r} is a recurrent node's final state but no graph input feeds its "
                "initial state, so a session's state cannot be carried through it; it is served "
                "as an output"
            )
        lines += tensor_lines("outputs", n_out, value, True)
        n_out += 1
    for n, (state_in, state_out) in enumerate(pairs):
        value = by_name[state_in]
        dims = _dims(value)
        batch, _ = role_axes(value)
        lines += ["", "[[states]]", f"input = {_toml(state_in)}"]
        if state_out is None:
            candidates = asked.get(state_in, [])
            lines.append('output = ""  # FILL')
            result.todo.append(
                f"states[{n}].output: {state_in!r} looks like state (it has no time axis) but no "
                "recurrent node says which graph output returns its next value"
                + (f"; candidates of its shape: {candidates}" if candidates else "")
                + (" (left out of [[outputs]])" if len(candidates) == 1 else "")
                + " (or, if it is a per-step input, move it to [[inputs]])"
            )
        else:
            lines.append(f"output = {_toml(state_out)}")
        lines.append(f"dtype = {_toml(_DTYPES.get(value.type.tensor_type.elem_type, ''))}")
        shape = [d if isinstance(d, int) else -1 for d in dims]
        lines.append(f"shape = {_toml(shape)}")
        if len(batch) == 1:
            lines.append(f"batch_axis = {batch[0]}")
        else:
            lines.append("batch_axis = -1  # FILL")
            result.todo.append(
                f"states[{n}].batch_axis: the graph does not say which axis of {state_in!r} "
                f"(shape {_shape(dims)}) holds the sessions"
            )
        unknown = [i for i, d in enumerate(shape) if d == -1 and i not in batch]
        if unknown:
            result.todo.append(
                f"states[{n}].shape: axes {unknown} of {state_in!r} are dynamic in the graph; a "
                "state's extents other than the batch axis must be written out"
            )
    if not pairs:
        result.todo.append(
            "states: no graph input feeds a recurrent node's initial state, so there is no "
            "state to carry between steps (export with the state as inputs and outputs)"
        )
    result.text = "\n".join(lines) + "\n"
    return result


def _compatible(a: list[int | str | None], b: list[int | str | None]) -> bool:
    """Same rank, and no axis where both extents are fixed and differ."""
    return len(a) == len(b) and all(
        not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b, strict=True)
    )


def _shape(dims: list[int | str | None]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def batch_first_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the recurrent nodes with ``layout = 1`` (onnxruntime's CPU kernels refuse them)."""
    return [
        n.name or n.op_type
        for n in proto.graph.node
        if n.op_type in _RECURRENT and _attr(n, "layout", 0) == 1
    ]


def to_time_major(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every ``layout = 1`` recurrent node made ``layout = 0``.

    Transposes go around the node (X (B, T, F) → (T, B, F); states (B, D, H) → (D, B, H);
    Y (T, D, B, H) → (B, T, D, H)), so the graph's inputs and outputs, and therefore its
    config, do not change, and it computes the same values. onnxruntime 1.31's CPU kernels
    refuse ``layout = 1`` ("Batchwise recurrent operations (layout == 1) are not supported").
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(graph.node):
        if node.op_type not in _RECURRENT or _attr(node, "layout", 0) != 1:
            nodes.append(node)
            continue
        tag = node.name or f"{node.op_type.lower()}_{k}"
        inner = onnx.NodeProto()
        inner.CopyFrom(node)
        for attr in inner.attribute:
            if attr.name == "layout":
                attr.i = 0
        for slot, perm in ((0, [1, 0, 2]), (5, [1, 0, 2]), (6, [1, 0, 2])):
            if slot < len(inner.input) and inner.input[slot]:
                moved = f"{tag}_{slot}_time_major"
                nodes.append(helper.make_node("Transpose", [inner.input[slot]], [moved], perm=perm))
                inner.input[slot] = moved
        after = []
        for slot, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2]), (2, [1, 0, 2])):
            if slot < len(inner.output) and inner.output[slot]:
                moved = f"{tag}_out{slot}_time_major"
                after.append(
                    helper.make_node("Transpose", [moved], [inner.output[slot]], perm=perm)
                )
                inner.output[slot] = moved
        nodes += [inner, *after]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model
