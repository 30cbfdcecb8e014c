"""Export a :class:`SequenceModel` to ONNX with native ``RNN`` / ``LSTM`` / ``GRU`` nodes.

The graph is written with ``onnx.helper`` straight from the trained weights instead of through
``torch.onnx.export``: torch's default (dynamo) exporter cannot trace LSTM/GRU over a dynamic time
axis and unrolls ``nn.RNN`` to a fixed length, and neither exporter emits a peephole LSTM (``P``)
or the paper's GRU (``linear_before_reset=0``). Building the node ourselves gives the server
exactly what it needs: one node per layer, dynamic batch and time axes, and the recurrent state
as named graph inputs and outputs.

Layout (time-first, as ONNX's recurrent operators are): input ``x`` (T, N, F) float or
``tokens`` (T, N) int64; ``initial_h`` (and ``initial_c``) (layers, N, H) in; the readout ``y``
(T, N, O) and ``Y_h`` (and ``Y_c``) (layers, N, H) out. The batch axis is 1 everywhere.
A ``batch_first`` model's graph takes and gives what the module does, (N, T, ...), through a
Transpose on each side of the recurrent nodes (as torch's exporter writes ``nn.LSTM(batch_first=
True)``); its state stays (layers, N, H), as PyTorch keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .network import SequenceModel

OPSET = 17
IR_VERSION = 8

#: ONNX operator, gate count and gate permutation (PyTorch's order → ONNX's order) per kind.
_ONNX_LAYOUT: dict[str, tuple[str, int, list[int]]] = {
    "rnn": ("RNN", 1, [0]),
    "lstm": ("LSTM", 4, [0, 3, 1, 2]),  # i f g o → i o f c
    "peephole_lstm": ("LSTM", 4, [0, 3, 1, 2]),
    "gru": ("GRU", 3, [1, 0, 2]),  # r z n → z r h
    "gru_torch": ("GRU", 3, [1, 0, 2]),
}


@dataclass(frozen=True)
class GraphNames:
    """The tensor names of an exported graph, which the repository's config.toml declares."""

    input: str
    output: str
    state_pairs: tuple[tuple[str, str], ...]


def graph_names(model: SequenceModel, output_name: str = "y") -> GraphNames:
    pairs = [("initial_h", "Y_h")]
    if model.has_cell_state:
        pairs.append(("initial_c", "Y_c"))
    return GraphNames("tokens" if model.spec.tokens else "x", output_name, tuple(pairs))


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def _layer_initializers(model: SequenceModel, layer: int) -> dict[str, np.ndarray]:
    """One layer's W, R, B (and P) in ONNX's layout, with num_directions = 1 in front."""
    kind = model.spec.kind
    _, gates, order = _ONNX_LAYOUT[kind]
    rnn = model.rnn

    def reorder(value: np.ndarray) -> np.ndarray:
        chunks = np.split(value, gates, axis=0)
        if kind == "gru":
            # ONNX's update gate is 1 - z of the paper's; σ(-a) = 1 - σ(a) makes it exact.
            chunks[1] = -chunks[1]
        return np.concatenate([chunks[g] for g in order], axis=0)

    w = reorder(_array(getattr(rnn, f"weight_ih_l{layer}")))
    r = reorder(_array(getattr(rnn, f"weight_hh_l{layer}")))
    result = {"W": w[None], "R": r[None]}
    if getattr(rnn, "bias", True) and hasattr(rnn, f"bias_ih_l{layer}"):
        wb = reorder(_array(getattr(rnn, f"bias_ih_l{layer}")))
        rb = reorder(_array(getattr(rnn, f"bias_hh_l{layer}")))
        result["B"] = np.concatenate([wb, rb])[None]
    if kind == "peephole_lstm":
        p_i, p_f, p_o = np.split(_array(getattr(rnn, f"weight_peephole_l{layer}")), 3)
        result["P"] = np.concatenate([p_i, p_o, p_f])[None]  # ONNX order: i, o, f
    return result


def to_onnx(model: SequenceModel, output_name: str = "y") -> onnx.ModelProto:
    """The model as one checked ONNX graph (see the module docstring for its layout)."""
    spec = model.spec
    op, _, _ = _ONNX_LAYOUT[spec.kind]
    names = graph_names(model, output_name)
    layers, hidden = spec.num_layers, spec.hidden_size
    lstm = model.has_cell_state
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    batch_first = model.batch_first
    sequence: list[str | int] = ["N", "T"] if batch_first else ["T", "N"]
    current = names.input
    if batch_first:  # the recurrent nodes read (T, N, ...): swap the first two axes
        perm = [1, 0] if spec.tokens else [1, 0, 2]
        nodes.append(helper.make_node("Transpose", [current], ["time_major"], perm=perm))
        current = "time_major"
    if spec.tokens:
        assert model.embedding is not None
        graph_input = helper.make_tensor_value_info(names.input, TensorProto.INT64, sequence)
        table = constant("embedding", _array(model.embedding.weight))
        nodes.append(helper.make_node("Gather", [table, current], ["features"], axis=0))
        current = "features"
    else:
        graph_input = helper.make_tensor_value_info(
            names.input, TensorProto.FLOAT, [*sequence, spec.input_size]
        )

    state_shape: list[str | int] = [layers, "N", hidden]
    state_inputs = [
        helper.make_tensor_value_info(i, TensorProto.FLOAT, state_shape)
        for i, _ in names.state_pairs
    ]
    state_outputs = [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, state_shape)
        for _, o in names.state_pairs
    ]

    def per_layer(state: str) -> list[str]:
        """The state input split into one (1, N, H) tensor per layer (itself for one layer)."""
        if layers == 1:
            return [state]
        parts = [f"{state}_l{k}" for k in range(layers)]
        split = constant(f"{state}_split", np.ones(layers, dtype=np.int64))
        nodes.append(helper.make_node("Split", [state, split], parts, axis=0))
        return parts

    h0 = per_layer("initial_h")
    c0 = per_layer("initial_c") if lstm else []
    squeeze_axis = constant("num_directions_axis", np.array([1], dtype=np.int64))
    final_h, final_c = [], []
    for k in range(layers):
        weights = _layer_initializers(model, k)
        w = constant(f"W_l{k}", weights["W"])
        r = constant(f"R_l{k}", weights["R"])
        b = constant(f"B_l{k}", weights["B"]) if "B" in weights else ""
        node_inputs = [current, w, r, b, "", h0[k]]
        node_outputs = [f"Y_l{k}", "Y_h" if layers == 1 else f"Y_h_l{k}"]
        if lstm:
            node_inputs.append(c0[k])
            node_outputs.append("Y_c" if layers == 1 else f"Y_c_l{k}")
            if "P" in weights:
                node_inputs.append(constant(f"P_l{k}", weights["P"]))
        attrs: dict[str, Any] = {"hidden_size": hidden}
        if op == "GRU":
            attrs["linear_before_reset"] = 1 if spec.kind == "gru_torch" else 0
        if op == "RNN":
            attrs["activations"] = ["Tanh"]
        nodes.append(
            helper.make_node(op, node_inputs, node_outputs, name=f"{op.lower()}_l{k}", **attrs)
        )
        final_h.append(node_outputs[1])
        if lstm:
            final_c.append(node_outputs[2])
        # Y is (T, num_directions=1, N, H); the next layer and the readout take (T, N, H).
        nodes.append(helper.make_node("Squeeze", [f"Y_l{k}", squeeze_axis], [f"hidden_l{k}"]))
        current = f"hidden_l{k}"
    if layers > 1:
        nodes.append(helper.make_node("Concat", final_h, ["Y_h"], axis=0))
        if lstm:
            nodes.append(helper.make_node("Concat", final_c, ["Y_c"], axis=0))

    readout_w = constant("readout_weight", _array(model.readout.weight).T.copy())
    readout_b = constant("readout_bias", _array(model.readout.bias))
    nodes.append(helper.make_node("MatMul", [current, readout_w], ["readout"]))
    readout = "readout_time_major" if batch_first else names.output
    nodes.append(helper.make_node("Add", ["readout", readout_b], [readout]))
    if batch_first:
        nodes.append(helper.make_node("Transpose", [readout], [names.output], perm=[1, 0, 2]))
    graph_output = helper.make_tensor_value_info(
        names.output, TensorProto.FLOAT, [*sequence, spec.output_size]
    )
    graph = helper.make_graph(
        nodes,
        f"rnnserve_{spec.kind}",
        [graph_input, *state_inputs],
        [graph_output, *state_outputs],
        inits,
    )
    exported = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve"
    )
    exported.ir_version = IR_VERSION
    onnx.checker.check_model(exported, full_check=True)
    return exported
