"""Small recurrent ONNX graphs, each with the config that describes it right.

Built with ``onnx.helper`` from seeded weights (no torch), a few hundred parameters each, to
be served under that config and under plausible mistakes of it
(``test_config_isolation_generated.py``). What the graphs cover:

- native ``RNN``/``GRU``/``LSTM`` nodes, ``layout = 0`` and ``layout = 1`` (batch first: made
  time-major with transposes, as onnxruntime's CPU kernels want), GRU with
  ``linear_before_reset`` 0 and 1, one and two layers, with and without the sequence output Y;
- cells written by hand (MatMul + Tanh in a ``Scan``) whose state has its batch on axis 0, 1
  or 2, one of them with two state pairs of the same shape;
- outputs whose batch axis is not where a config copied from the input would put it, an input
  with an extra dynamic axis, int64 token ids through an embedding ``Gather``;
- graphs that mix the sessions of a batch (over the batch axis, or only at some batch sizes)
  and an output whose "batch" axis has a fixed extent: no config may get these served.

Every dimension that follows the batch is named ``B`` and every time axis ``T``;
:func:`unnamed` clears the names, so only the server's check runs can tell the axes apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rnnserve.models.graph import to_time_major

F = 3  # input features
H = 4  # hidden size
V = 10  # vocabulary of the token model
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64

Config = dict[str, Any]


@dataclass
class Built:
    """A graph, its right config, and what serving it must do."""

    name: str
    proto: onnx.ModelProto
    config: Config
    #: Why no config of this graph may be served (it mixes sessions), or "" if it serves.
    mixes: str = ""
    #: Words the refusal of its right config says (where ``mixes``).
    refusal: str = ""


def _tensor(name: str, shape: list[int | str], batch_axis: int, time_axis: int = -1) -> Config:
    spec: Config = {
        "name": name,
        "dtype": "float32",
        "shape": [-1 if isinstance(e, str) else e for e in shape],
        "batch_axis": batch_axis,
    }
    if time_axis != -1:
        spec["time_axis"] = time_axis
    return spec


def _state(name_in: str, name_out: str, shape: list[int | str], batch_axis: int) -> Config:
    return {
        "input": name_in,
        "output": name_out,
        "dtype": "float32",
        "shape": [-1 if isinstance(e, str) else e for e in shape],
        "batch_axis": batch_axis,
    }


def _config(kind: str, inputs: list[Config], outputs: list[Config], states: list[Config]) -> Config:
    return {"cell_kind": kind, "inputs": inputs, "outputs": outputs, "states": states}


class _Weights:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.inits: list[onnx.TensorProto] = []

    def __call__(self, name: str, *shape: int, scale: float = 0.4) -> str:
        value = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    weights: _Weights,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, weights.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _vi(name: str, shape: list[int | str], elem: int = FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _recurrent(
    op: str, w: _Weights, tag: str, x: str, states: list[str], outs: list[str], features: int,
    **attrs: Any,
) -> onnx.NodeProto:  # fmt: skip
    """One forward recurrent node with its weights; ``outs`` = [Y, Y_h(, Y_c)] ("" to skip)."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    ins = [
        x,
        w(f"{tag}_W", 1, gates * H, features),
        w(f"{tag}_R", 1, gates * H, H),
        w(f"{tag}_B", 1, 2 * gates * H),
        "",
        *states,
    ]
    return helper.make_node(op, ins, outs, name=tag, hidden_size=H, **attrs)


# --- native recurrent nodes -------------------------------------------------------------------


def rnn_with_readout() -> Built:
    """RNN (layout 0) with Y, and a readout of Y laid out (T, 2, B): batch last."""
    w = _Weights(1)
    nodes = [
        _recurrent("RNN", w, "rnn", "x", ["h0"], ["Y", "h1"], F),
        helper.make_node("Squeeze", ["Y", w.const("ax1", np.array([1], np.int64))], ["Ys"]),
        helper.make_node("MatMul", ["Ys", w("Wo", H, 2)], ["r"]),  # (T, B, 2)
        helper.make_node("Transpose", ["r"], ["readout"], perm=[0, 2, 1]),  # (T, 2, B)
    ]
    proto = _model(
        "rnn_with_readout",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [1, "B", H])],
        [_vi("Y", ["T", 1, "B", H]), _vi("readout", ["T", 2, "B"]), _vi("h1", [1, "B", H])],
        w,
    )
    config = _config(
        "rnn",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", 1, "B", H], 2, 0), _tensor("readout", ["T", 2, "B"], 2, 0)],
        [_state("h0", "h1", [1, "B", H], 1)],
    )
    return Built("rnn_with_readout", proto, config)


def _gru_batch_first(name: str, linear_before_reset: int, time_major: bool) -> Built:
    w = _Weights(2)
    node = _recurrent(
        "GRU", w, "gru", "x", ["h0"], ["Y", "h1"], F,
        layout=1, linear_before_reset=linear_before_reset,
    )  # fmt: skip
    proto = _model(
        name,
        [node],
        [_vi("x", ["B", "T", F]), _vi("h0", ["B", 1, H])],
        [_vi("Y", ["B", "T", 1, H]), _vi("h1", ["B", 1, H])],
        w,
    )
    config = _config(
        "gru",
        [_tensor("x", ["B", "T", F], 0, 1)],
        [_tensor("Y", ["B", "T", 1, H], 0, 1)],
        [_state("h0", "h1", ["B", 1, H], 0)],
    )
    if time_major:
        proto = to_time_major(proto)
    return Built(name, proto, config)


def gru_batch_first() -> Built:
    """GRU ``layout = 1``, ``linear_before_reset = 0``: x (B, T, F), h (B, 1, H), Y (B, T, 1, H)."""
    return _gru_batch_first("gru_batch_first", 0, time_major=True)


def gru_layout1_as_is() -> Built:
    """The same graph left ``layout = 1``: onnxruntime's CPU kernels cannot run it."""
    built = _gru_batch_first("gru_layout1_as_is", 0, time_major=False)
    built.mixes = "onnxruntime cannot run layout = 1 on CPU"
    built.refusal = "onnxruntime cannot load the model"
    return built


def gru_final_only() -> Built:
    """GRU ``linear_before_reset = 1`` without Y: one output from the final state, (B, 2)."""
    w = _Weights(3)
    nodes = [
        _recurrent("GRU", w, "gru", "x", ["h0"], ["", "h1"], F, linear_before_reset=1),
        helper.make_node("Squeeze", ["h1", w.const("ax0", np.array([0], np.int64))], ["hs"]),
        helper.make_node("MatMul", ["hs", w("Wo", H, 2)], ["score"]),
    ]
    proto = _model(
        "gru_final_only",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [1, "B", H])],
        [_vi("score", ["B", 2]), _vi("h1", [1, "B", H])],
        w,
    )
    config = _config(
        "gru_torch",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("score", ["B", 2], 0)],
        [_state("h0", "h1", [1, "B", H], 1)],
    )
    return Built("gru_final_only", proto, config)


def _two_layers(op: str, w: _Weights, batch_first: bool) -> list[onnx.NodeProto]:
    """Two stacked layers over states (2, B, H) (time-major) or (B, 2, H) (batch first)."""
    lstm = op == "LSTM"
    layer_axis = 1 if batch_first else 0
    names = ["h0", "c0"] if lstm else ["h0"]
    nodes = []
    for s in names:
        nodes.append(
            helper.make_node(
                "Split", [s, w.const(f"split_{s}", np.array([1, 1], np.int64))],
                [f"{s}_a", f"{s}_b"], axis=layer_axis,
            )
        )  # fmt: skip
    attrs = {"layout": 1} if batch_first else {}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    first_out = ["Y1", "h1_a", "c1_a"] if lstm else ["Y1", "h1_a"]
    nodes.append(_recurrent(op, w, "layer1", "x", [f"{s}_a" for s in names], first_out, F, **attrs))
    squeeze = w.const("y_dirs", np.array([2 if batch_first else 1], np.int64))
    nodes.append(helper.make_node("Squeeze", ["Y1", squeeze], ["X2"]))
    second_out = ["Y", "h1_b", "c1_b"] if lstm else ["Y", "h1_b"]
    nodes.append(
        _recurrent(op, w, "layer2", "X2", [f"{s}_b" for s in names], second_out, H, **attrs)
    )
    for s in ["h1", "c1"] if lstm else ["h1"]:
        nodes.append(helper.make_node("Concat", [f"{s}_a", f"{s}_b"], [s], axis=layer_axis))
    return nodes


def lstm_two_layers() -> Built:
    """Two-layer LSTM, ``layout = 0``: states h and c (2, B, H), Y (T, 1, B, H)."""
    w = _Weights(4)
    proto = _model(
        "lstm_two_layers",
        _two_layers("LSTM", w, batch_first=False),
        [_vi("x", ["T", "B", F]), _vi("h0", [2, "B", H]), _vi("c0", [2, "B", H])],
        [_vi("Y", ["T", 1, "B", H]), _vi("h1", [2, "B", H]), _vi("c1", [2, "B", H])],
        w,
    )
    config = _config(
        "lstm",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", 1, "B", H], 2, 0)],
        [_state("h0", "h1", [2, "B", H], 1), _state("c0", "c1", [2, "B", H], 1)],
    )
    return Built("lstm_two_layers", proto, config)


def lstm_two_layers_batch_first() -> Built:
    """Two-layer LSTM, ``layout = 1``: x (B, T, F), h and c (B, 2, H), Y (B, T, 1, H)."""
    w = _Weights(5)
    proto = _model(
        "lstm_two_layers_batch_first",
        _two_layers("LSTM", w, batch_first=True),
        [_vi("x", ["B", "T", F]), _vi("h0", ["B", 2, H]), _vi("c0", ["B", 2, H])],
        [_vi("Y", ["B", "T", 1, H]), _vi("h1", ["B", 2, H]), _vi("c1", ["B", 2, H])],
        w,
    )
    config = _config(
        "lstm",
        [_tensor("x", ["B", "T", F], 0, 1)],
        [_tensor("Y", ["B", "T", 1, H], 0, 1)],
        [_state("h0", "h1", ["B", 2, H], 0), _state("c0", "c1", ["B", 2, H], 0)],
    )
    return Built("lstm_two_layers_batch_first", to_time_major(proto), config)


def gru_two_layers_top_state() -> Built:
    """Two-layer GRU without Y as an output: a readout of the top layer's final state,
    (1, B, 2), whose batch is on axis 1 although the input's is on axis 1 too: the naive
    config here is right, the mistakes move it."""
    w = _Weights(6)
    nodes = _two_layers("GRU", w, batch_first=False)
    nodes.append(helper.make_node("MatMul", ["h1_b", w("Wo", H, 2)], ["top"]))
    proto = _model(
        "gru_two_layers_top_state",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [2, "B", H])],
        [_vi("top", [1, "B", 2]), _vi("h1", [2, "B", H])],
        w,
    )
    config = _config(
        "gru_torch",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("top", [1, "B", 2], 1)],
        [_state("h0", "h1", [2, "B", H], 1)],
    )
    return Built("gru_two_layers_top_state", proto, config)


def tokens_through_embedding() -> Built:
    """int64 token ids (B, T) through a Gather into a GRU; logits (B, T, V), batch first."""
    w = _Weights(7)
    nodes = [
        helper.make_node("Gather", [w("E", V, F), "tokens"], ["e"]),  # (B, T, F)
        helper.make_node("Transpose", ["e"], ["x"], perm=[1, 0, 2]),  # (T, B, F)
        _recurrent("GRU", w, "gru", "x", ["h0"], ["Y", "h1"], F),
        helper.make_node("Squeeze", ["Y", w.const("ax1", np.array([1], np.int64))], ["Ys"]),
        helper.make_node("MatMul", ["Ys", w("Wo", H, V)], ["l"]),  # (T, B, V)
        helper.make_node("Transpose", ["l"], ["logits"], perm=[1, 0, 2]),
    ]
    proto = _model(
        "tokens_through_embedding",
        nodes,
        [_vi("tokens", ["B", "T"], INT64), _vi("h0", [1, "B", H])],
        [_vi("logits", ["B", "T", V]), _vi("h1", [1, "B", H])],
        w,
    )
    tokens = _tensor("tokens", ["B", "T"], 0, 1)
    tokens.update(dtype="int64", range=[0, V - 1])
    config = _config(
        "gru",
        [tokens],
        [_tensor("logits", ["B", "T", V], 0, 1)],
        [_state("h0", "h1", [1, "B", H], 1)],
    )
    return Built("tokens_through_embedding", proto, config)


def input_with_extra_axis() -> Built:
    """x (T, B, K, F) with K dynamic (a set of readings per timestep), averaged over K."""
    w = _Weights(8)
    nodes = [
        # opset 17: ReduceMean takes its axes as an attribute
        helper.make_node("ReduceMean", ["x"], ["xm"], axes=[2], keepdims=0),  # (T, B, F)
        _recurrent("RNN", w, "rnn", "xm", ["h0"], ["Y", "h1"], F),
    ]
    proto = _model(
        "input_with_extra_axis",
        nodes,
        [_vi("x", ["T", "B", "K", F]), _vi("h0", [1, "B", H])],
        [_vi("Y", ["T", 1, "B", H]), _vi("h1", [1, "B", H])],
        w,
    )
    config = _config(
        "rnn",
        [_tensor("x", ["T", "B", "K", F], 1, 0)],
        [_tensor("Y", ["T", 1, "B", H], 2, 0)],
        [_state("h0", "h1", [1, "B", H], 1)],
    )
    return Built("input_with_extra_axis", proto, config)


# --- cells written by hand --------------------------------------------------------------------


def _scan(
    w: _Weights, states: list[str], finals: list[str], x: str, y: str, two: bool = False
) -> onnx.NodeProto:
    """``Scan`` over time of ``h' = tanh(x_t Wx + h Wh)`` on states (B, H), x (T, B, F),
    y (T, B, H); with ``two``, a second state ``a' = 0.5 a + h'`` and ``y_t = tanh(h' + a')``."""
    wx, wh = w("Wx", F, H), w("Wh", H, H)
    body_nodes = [
        helper.make_node("MatMul", ["x_t", wx], ["xw"]),
        helper.make_node("MatMul", ["h_prev", wh], ["hw"]),
        helper.make_node("Add", ["xw", "hw"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_next"]),
    ]
    body_in = [_vi("h_prev", ["B", H])]
    body_out = [_vi("h_next", ["B", H])]
    if two:
        half = w.const("half", np.array(0.5, np.float32))
        body_nodes += [
            helper.make_node("Mul", ["a_prev", half], ["a_half"]),
            helper.make_node("Add", ["a_half", "h_next"], ["a_next"]),
            helper.make_node("Add", ["h_next", "a_next"], ["ya"]),
            helper.make_node("Tanh", ["ya"], ["y_t"]),
        ]
        body_in.append(_vi("a_prev", ["B", H]))
        body_out += [_vi("a_next", ["B", H]), _vi("y_t", ["B", H])]
    else:
        body_nodes.append(helper.make_node("Identity", ["h_next"], ["y_t"]))
        body_out.append(_vi("y_t", ["B", H]))
    body_in.append(_vi("x_t", ["B", F]))
    body = helper.make_graph(body_nodes, "cell", body_in, body_out)
    return helper.make_node(
        "Scan", [*states, x], [*finals, y], name="cell", body=body, num_scan_inputs=1
    )


def cell_state_batch_axis_0() -> Built:
    """Hand-written tanh cell, state (B, H); Y (T, B, H) and also Y as (B, H, T)."""
    w = _Weights(9)
    nodes = [
        _scan(w, ["h0"], ["h1"], "x", "Y"),
        helper.make_node("Transpose", ["Y"], ["Y_bht"], perm=[1, 2, 0]),
    ]
    proto = _model(
        "cell_state_batch_axis_0",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", ["B", H])],
        [_vi("Y", ["T", "B", H]), _vi("Y_bht", ["B", H, "T"]), _vi("h1", ["B", H])],
        w,
    )
    config = _config(
        "tanh_cell",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", "B", H], 1, 0), _tensor("Y_bht", ["B", H, "T"], 0, 2)],
        [_state("h0", "h1", ["B", H], 0)],
    )
    return Built("cell_state_batch_axis_0", proto, config)


def cell_two_states_batch_axis_1() -> Built:
    """Hand-written cell with two state pairs of one shape, (H, B): batch on axis 1."""
    w = _Weights(10)
    nodes = [
        helper.make_node("Transpose", ["h0"], ["h0_bh"], perm=[1, 0]),
        helper.make_node("Transpose", ["a0"], ["a0_bh"], perm=[1, 0]),
        _scan(w, ["h0_bh", "a0_bh"], ["h1_bh", "a1_bh"], "x", "Y", two=True),
        helper.make_node("Transpose", ["h1_bh"], ["h1"], perm=[1, 0]),
        helper.make_node("Transpose", ["a1_bh"], ["a1"], perm=[1, 0]),
    ]
    proto = _model(
        "cell_two_states_batch_axis_1",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [H, "B"]), _vi("a0", [H, "B"])],
        [_vi("Y", ["T", "B", H]), _vi("h1", [H, "B"]), _vi("a1", [H, "B"])],
        w,
    )
    config = _config(
        "tanh_cell_acc",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", "B", H], 1, 0)],
        [_state("h0", "h1", [H, "B"], 1), _state("a0", "a1", [H, "B"], 1)],
    )
    return Built("cell_two_states_batch_axis_1", proto, config)


def cell_state_batch_axis_2() -> Built:
    """Hand-written cell whose state is (2, H/2, B): batch last, behind two real axes."""
    w = _Weights(11)
    to_bh = w.const("to_bh", np.array([-1, H], np.int64))
    to_state = w.const("to_state", np.array([-1, 2, H // 2], np.int64))
    nodes = [
        helper.make_node("Transpose", ["h0"], ["h0_b"], perm=[2, 0, 1]),  # (B, 2, H/2)
        helper.make_node("Reshape", ["h0_b", to_bh], ["h0_bh"]),  # (B, H)
        _scan(w, ["h0_bh"], ["h1_bh"], "x", "Yt"),
        helper.make_node("Reshape", ["h1_bh", to_state], ["h1_b"]),  # (B, 2, H/2)
        helper.make_node("Transpose", ["h1_b"], ["h1"], perm=[1, 2, 0]),  # (2, H/2, B)
        helper.make_node("Transpose", ["Yt"], ["Y"], perm=[1, 0, 2]),  # (B, T, H)
    ]
    proto = _model(
        "cell_state_batch_axis_2",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [2, H // 2, "B"])],
        [_vi("Y", ["B", "T", H]), _vi("h1", [2, H // 2, "B"])],
        w,
    )
    config = _config(
        "tanh_cell",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["B", "T", H], 0, 1)],
        [_state("h0", "h1", [2, H // 2, "B"], 2)],
    )
    return Built("cell_state_batch_axis_2", proto, config)


def cell_two_states_in_a_loop() -> Built:
    """The two-state cell as a ``Loop`` over the timesteps (states (B, H), Y (T, B, H))."""
    w = _Weights(18)
    wx, wh = w("Wx", F, H), w("Wh", H, H)
    half = w.const("half", np.array(0.5, np.float32))
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "i"], ["x_t"], axis=0),  # x from the outer graph
            helper.make_node("MatMul", ["x_t", wx], ["xw"]),
            helper.make_node("MatMul", ["h_prev", wh], ["hw"]),
            helper.make_node("Add", ["xw", "hw"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_next"]),
            helper.make_node("Mul", ["a_prev", half], ["a_half"]),
            helper.make_node("Add", ["a_half", "h_next"], ["a_next"]),
            helper.make_node("Add", ["h_next", "a_next"], ["ya"]),
            helper.make_node("Tanh", ["ya"], ["y_t"]),
            helper.make_node("Identity", ["cond"], ["cond_out"]),
        ],
        "cell",
        [
            _vi("i", [], INT64),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            _vi("h_prev", ["B", H]),
            _vi("a_prev", ["B", H]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            _vi("h_next", ["B", H]),
            _vi("a_next", ["B", H]),
            _vi("y_t", ["B", H]),
        ],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["steps"], start=0, end=1),
        helper.make_node("Squeeze", ["steps"], ["trips"]),
        helper.make_node("Loop", ["trips", "", "h0", "a0"], ["h1", "a1", "Y"], body=body),
    ]
    proto = _model(
        "cell_two_states_in_a_loop",
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", ["B", H]), _vi("a0", ["B", H])],
        [_vi("Y", ["T", "B", H]), _vi("h1", ["B", H]), _vi("a1", ["B", H])],
        w,
    )
    config = _config(
        "tanh_cell_acc",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", "B", H], 1, 0)],
        [_state("h0", "h1", ["B", H], 0), _state("a0", "a1", ["B", H], 0)],
    )
    return Built("cell_two_states_in_a_loop", proto, config)


# --- graphs no config may serve ---------------------------------------------------------------


def _rnn_then(name: str, seed: int, tail: Callable[[_Weights], list[onnx.NodeProto]]) -> Built:
    """An RNN (x (T, B, F), h (1, B, H)) whose Y and next state pass through ``tail``, which
    reads ``Y_rnn`` and ``h_rnn`` and writes ``Y`` and ``h1``."""
    w = _Weights(seed)
    nodes = [_recurrent("RNN", w, "rnn", "x", ["h0"], ["Y_rnn", "h_rnn"], F), *tail(w)]
    proto = _model(
        name,
        nodes,
        [_vi("x", ["T", "B", F]), _vi("h0", [1, "B", H])],
        [_vi("Y", ["T", 1, "B", H]), _vi("h1", [1, "B", H])],
        w,
    )
    config = _config(
        "rnn",
        [_tensor("x", ["T", "B", F], 1, 0)],
        [_tensor("Y", ["T", 1, "B", H], 2, 0)],
        [_state("h0", "h1", [1, "B", H], 1)],
    )
    return Built(name, proto, config)


def state_mixed_over_the_batch() -> Built:
    """The next state plus half the batch's mean state: sessions leak through the state."""

    def tail(w: _Weights) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Identity", ["Y_rnn"], ["Y"]),
            helper.make_node("ReduceMean", ["h_rnn"], ["h_mean"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["h_mean", w.const("half", np.array(0.5, np.float32))],
                             ["h_half"]),
            helper.make_node("Add", ["h_rnn", "h_half"], ["h1"]),
        ]  # fmt: skip

    built = _rnn_then("state_mixed_over_the_batch", 12, tail)
    built.mixes = "the next state adds the batch's mean state"
    built.refusal = "field states[0].batch_axis: session 0 of a batch of 3 got other values"
    return built


def output_summed_over_the_batch() -> Built:
    """Y summed over the batch, kept as an axis of extent 1 the graph calls ``B``."""

    def tail(w: _Weights) -> list[onnx.NodeProto]:
        return [
            helper.make_node("ReduceSum", ["Y_rnn", w.const("ax2", np.array([2], np.int64))],
                             ["Y"], keepdims=1),
            helper.make_node("Identity", ["h_rnn"], ["h1"]),
        ]  # fmt: skip

    built = _rnn_then("output_summed_over_the_batch", 13, tail)
    built.mixes = "Y is a sum over the batch"
    built.refusal = "field outputs[0].batch_axis"
    return built


def output_rolled_over_the_batch(shift: int) -> Callable[[], Built]:
    """Y of session (b + shift) mod B handed to session b: the rows of a batch of 1 (and of
    any batch whose size divides ``shift``) stay in place."""

    def build() -> Built:
        def tail(w: _Weights) -> list[onnx.NodeProto]:
            return [
                helper.make_node("Shape", ["Y_rnn"], ["shape"], start=2, end=3),  # [B]
                helper.make_node("Squeeze", ["shape"], ["n"]),
                helper.make_node(
                    "Range",
                    [w.const("zero", np.array(0, np.int64)), "n",
                     w.const("one", np.array(1, np.int64))],
                    ["rows"],
                ),
                helper.make_node("Add", ["rows", w.const("shift", np.array(shift, np.int64))],
                                 ["moved"]),
                helper.make_node("Mod", ["moved", "n"], ["source"]),
                helper.make_node("Gather", ["Y_rnn", "source"], ["Y"], axis=2),
                helper.make_node("Identity", ["h_rnn"], ["h1"]),
            ]  # fmt: skip

        built = _rnn_then(f"output_rolled_by_{shift}", 14 + shift, tail)
        built.mixes = f"Y of session b is Y of session (b + {shift}) mod B"
        built.refusal = "field outputs[0].batch_axis: session 0 of a batch of 2 got other values"
        return built

    return build


def output_of_fixed_extent() -> Built:
    """An output of fixed shape (3, H) (a mean over the batch and time, repeated): its
    axis 0 is 3 whatever the batch, the probe's first batch size."""

    def tail(w: _Weights) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Identity", ["Y_rnn"], ["Y"]),
            helper.make_node("Identity", ["h_rnn"], ["h1"]),
            helper.make_node("ReduceMean", ["Y_rnn"], ["m"], axes=[0, 1, 2], keepdims=0),
            helper.make_node("Unsqueeze", ["m", w.const("ax0", np.array([0], np.int64))],
                             ["m1"]),
            helper.make_node("Tile", ["m1", w.const("reps", np.array([3, 1], np.int64))],
                             ["summary"]),
        ]  # fmt: skip

    built = _rnn_then("output_of_fixed_extent", 17, tail)
    built.proto.graph.output.append(_vi("summary", ["B", H]))
    built.config["outputs"].append(_tensor("summary", ["B", H], 0))
    built.mixes = "summary has 3 rows whatever the batch: a mean over every session"
    built.refusal = "field outputs[1].batch_axis"
    return built


BUILDERS: dict[str, Callable[[], Built]] = {
    "rnn_with_readout": rnn_with_readout,
    "gru_batch_first": gru_batch_first,
    "gru_layout1_as_is": gru_layout1_as_is,
    "gru_final_only": gru_final_only,
    "lstm_two_layers": lstm_two_layers,
    "lstm_two_layers_batch_first": lstm_two_layers_batch_first,
    "gru_two_layers_top_state": gru_two_layers_top_state,
    "tokens_through_embedding": tokens_through_embedding,
    "input_with_extra_axis": input_with_extra_axis,
    "cell_state_batch_axis_0": cell_state_batch_axis_0,
    "cell_two_states_batch_axis_1": cell_two_states_batch_axis_1,
    "cell_state_batch_axis_2": cell_state_batch_axis_2,
    "cell_two_states_in_a_loop": cell_two_states_in_a_loop,
    "state_mixed_over_the_batch": state_mixed_over_the_batch,
    "output_summed_over_the_batch": output_summed_over_the_batch,
    "output_rolled_by_3": output_rolled_over_the_batch(3),
    "output_of_fixed_extent": output_of_fixed_extent,
}


def unnamed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with every named dimension of its inputs and outputs made anonymous."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in [*copy.graph.input, *copy.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.Clear()
    return copy
