"""``nn.LSTM(proj_size=P)`` in ONNX: a ``Scan`` over one step of the projected cell.

ONNX's ``LSTM`` has no projection, and torch's exporters refuse it ("LSTM with projections is
not supported"). For the export only, :func:`exportable` swaps each such layer for a module
that computes the same thing and shows the TorchScript exporter one placeholder node per
layer (``rnnserve::ProjectedLSTMLayer``); :func:`expand_scans` then replaces each
placeholder with a ``Scan`` whose body is PyTorch's projected cell:

    i, f, g, o = split(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)      (torch's gate order)
    c_t = σ(f) * c_{t-1} + σ(i) * tanh(g)
    h_t = (σ(o) * tanh(c_t)) W_hr^T                                    (B, P)

The state stays (layers, B, P) for ``h`` and (layers, B, H) for ``c``, as torch has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

DOMAIN = "rnnserve"
OP = "ProjectedLSTMLayer"


class _Layer(torch.autograd.Function):
    """One projected LSTM layer, time-first: (x, h0, c0, weights) -> (y, h, c)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN205
        ys = []
        for t in range(x.shape[0]):
            gates = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = (torch.sigmoid(o) * torch.tanh(c)) @ w_hr.T
            ys.append(h)
        return torch.stack(ys), h, c

    @staticmethod
    def symbolic(g, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN205
        y, h_out, c_out = g.op(f"{DOMAIN}::{OP}", x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, outputs=3)
        y.setType(x.type().with_sizes([None, None, None]))
        h_out.setType(h.type())
        c_out.setType(c.type())
        return y, h_out, c_out


class _ProjectedLSTM(nn.Module):
    """Stands in for an ``nn.LSTM`` with ``proj_size`` during export (same weights)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        lstm = self.lstm
        if lstm.batch_first:
            x = x.transpose(0, 1)
        if state is None:
            batch = x.shape[1]
            state = (
                torch.zeros(lstm.num_layers, batch, lstm.proj_size),
                torch.zeros(lstm.num_layers, batch, lstm.hidden_size),
            )
        h0, c0 = state
        hs, cs = [], []
        for k in range(lstm.num_layers):
            w_ih = getattr(lstm, f"weight_ih_l{k}")
            zeros = torch.zeros(w_ih.shape[0])
            b_ih = getattr(lstm, f"bias_ih_l{k}") if lstm.bias else zeros
            b_hh = getattr(lstm, f"bias_hh_l{k}") if lstm.bias else zeros
            x, h, c = _Layer.apply(
                x,
                h0[k],
                c0[k],
                w_ih,
                getattr(lstm, f"weight_hh_l{k}"),
                b_ih,
                b_hh,
                getattr(lstm, f"weight_hr_l{k}"),
            )
            hs.append(h)
            cs.append(c)
        if lstm.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(hs), torch.stack(cs))


@contextmanager
def exportable(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with every projected ``nn.LSTM`` swapped for its exportable twin (restored)."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    targets = [module] if _projected(module) else []
    for parent in module.modules():
        for child_name, child in parent.named_children():
            if _projected(child):
                setattr(parent, child_name, _ProjectedLSTM(child))  # type: ignore[arg-type]
                swapped.append((parent, child_name, child))
    try:
        yield _ProjectedLSTM(module) if targets else module  # type: ignore[arg-type]
    finally:
        for parent, child_name, child in swapped:
            setattr(parent, child_name, child)


def _projected(module: nn.Module) -> bool:
    return isinstance(module, nn.LSTM) and module.proj_size > 0


def _scan(node: onnx.NodeProto, k: int, hidden: int) -> list[onnx.NodeProto]:
    """The nodes that replace one placeholder: transposed weights, summed bias, the Scan."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = node.input
    y, h_n, c_n = node.output
    p = f"projected_lstm_{k}_"
    outer = [
        helper.make_node("Transpose", [w_ih], [p + "w_ih_t"]),
        helper.make_node("Transpose", [w_hh], [p + "w_hh_t"]),
        helper.make_node("Transpose", [w_hr], [p + "w_hr_t"]),
        helper.make_node("Add", [b_ih, b_hh], [p + "bias"]),
    ]
    body_nodes = [
        helper.make_node("MatMul", ["x_t", p + "w_ih_t"], ["gx"]),
        helper.make_node("MatMul", ["h_prev", p + "w_hh_t"], ["gh"]),
        helper.make_node("Add", ["gx", "gh"], ["gxh"]),
        helper.make_node("Add", ["gxh", p + "bias"], ["gates"]),
        helper.make_node("Split", ["gates", "sizes"], ["gi", "gf", "gg", "go"], axis=1),
        helper.make_node("Sigmoid", ["gi"], ["i"]),
        helper.make_node("Sigmoid", ["gf"], ["f"]),
        helper.make_node("Tanh", ["gg"], ["g"]),
        helper.make_node("Sigmoid", ["go"], ["o"]),
        helper.make_node("Mul", ["f", "c_prev"], ["fc"]),
        helper.make_node("Mul", ["i", "g"], ["ig"]),
        helper.make_node("Add", ["fc", "ig"], ["c_next"]),
        helper.make_node("Tanh", ["c_next"], ["tanh_c"]),
        helper.make_node("Mul", ["o", "tanh_c"], ["h_full"]),
        helper.make_node("MatMul", ["h_full", p + "w_hr_t"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["y_t"]),
    ]
    float_2d = [None, None]
    body = helper.make_graph(
        body_nodes,
        p + "step",
        [
            helper.make_tensor_value_info("h_prev", TensorProto.FLOAT, float_2d),
            helper.make_tensor_value_info("c_prev", TensorProto.FLOAT, float_2d),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, float_2d),
        ],
        [
            helper.make_tensor_value_info("h_next", TensorProto.FLOAT, float_2d),
            helper.make_tensor_value_info("c_next", TensorProto.FLOAT, float_2d),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, float_2d),
        ],
        [numpy_helper.from_array(np.full(4, hidden, dtype=np.int64), "sizes")],
    )
    scan = helper.make_node("Scan", [h0, c0, x], [h_n, c_n, y], num_scan_inputs=1, body=body)
    return [*outer, scan]


def expand_scans(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``rnnserve::ProjectedLSTMLayer`` placeholder by its ``Scan``."""
    if not any(n.domain == DOMAIN for n in proto.graph.node):
        return proto
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for k, node in enumerate(proto.graph.node):
        if node.domain == DOMAIN and node.op_type == OP:
            hidden = shapes[node.input[3]][0] // 4 if node.input[3] in shapes else None
            if hidden is None:
                raise ValueError(f"{OP}: the weights of layer {k} are not initializers")
            nodes += _scan(node, k, hidden)
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    kept = [o for o in proto.opset_import if o.domain != DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return proto
