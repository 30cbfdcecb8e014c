"""The recurrent cells of "Understanding LSTM Networks", as multi-layer PyTorch modules.

Every module here has the same shape as ``torch.nn.LSTM``: ``forward(x, state)`` with ``x`` of
shape (T, B, F) (or (B, T, F) with ``batch_first=True``), the state as (layers, B, H) tensors,
and parameters named ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``
in PyTorch's gate order. That one layout is what :mod:`rnnserve.models.onnx_export` reads, so
an exporter need not know which class it holds, only its ``kind``.

Three kinds are PyTorch's own fused modules with the paper's defaults (they train fast on CPU);
the two PyTorch lacks, the peephole LSTM and the paper's GRU, are written out here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: State as PyTorch modules take and return it: ``h`` alone, or ``(h, c)`` for the LSTMs.
State = Tensor | tuple[Tensor, Tensor]


class VanillaRNN(nn.RNN):
    """The plain recurrent network: one tanh layer.

    ``h_t = tanh(W_hx x_t + W_hh h_{t-1} [+ b])``

    The paper's form has no bias, so ``bias`` defaults to False here. ONNX: ``RNN`` node,
    ``activations=["Tanh"]``.
    """

    kind = "rnn"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = False,
        batch_first: bool = False,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            nonlinearity="tanh",
            bias=bias,
            batch_first=batch_first,
        )


class LSTM(nn.LSTM):
    """The long short-term memory network (PyTorch's fused module, gate order i, f, g, o).

    ``f_t = σ(W_f [h_{t-1}, x_t] + b_f)``, ``i_t = σ(W_i [h_{t-1}, x_t] + b_i)``,
    ``C~_t = tanh(W_C [h_{t-1}, x_t] + b_C)``, ``C_t = f_t * C_{t-1} + i_t * C~_t``,
    ``o_t = σ(W_o [h_{t-1}, x_t] + b_o)``, ``h_t = o_t * tanh(C_t)``.

    ONNX: ``LSTM`` node (gate order i, o, f, c there; the exporter reorders).
    """

    kind = "lstm"


class TorchGRU(nn.GRU):
    """PyTorch's GRU: the reset gate multiplies ``h_{t-1}`` *after* its linear map.

    ``r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)``,
    ``z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)``,
    ``n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))``,
    ``h_t = (1 - z_t) * n_t + z_t * h_{t-1}``.

    ONNX: ``GRU`` node with ``linear_before_reset=1``. Not the paper's form: see :class:`GRU`.
    """

    kind = "gru_torch"


class _Unfused(nn.Module):
    """A stack of layers stepped in Python, with PyTorch's parameter names and gate layout."""

    kind = ""
    gates = 1
    has_cell = False

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        bound = hidden_size**-0.5
        for k in range(num_layers):
            width = input_size if k == 0 else hidden_size
            shapes: dict[str, tuple[int, ...]] = {
                f"weight_ih_l{k}": (self.gates * hidden_size, width),
                f"weight_hh_l{k}": (self.gates * hidden_size, hidden_size),
            }
            if bias:
                shapes[f"bias_ih_l{k}"] = (self.gates * hidden_size,)
                shapes[f"bias_hh_l{k}"] = (self.gates * hidden_size,)
            shapes.update(self._extra_parameters(k))
            for name, shape in shapes.items():
                # PyTorch's own initialisation for its recurrent modules: U(-1/sqrt(H), 1/sqrt(H)).
                value = torch.empty(shape).uniform_(-bound, bound)
                self.register_parameter(name, nn.Parameter(value))

    def _extra_parameters(self, layer: int) -> dict[str, tuple[int, ...]]:
        return {}

    def layer_parameters(self, layer: int) -> dict[str, Tensor]:
        """This layer's parameters by their name without the ``_l{k}`` suffix."""
        suffix = f"_l{layer}"
        return {
            name.removesuffix(suffix): value
            for name, value in self.named_parameters()
            if name.endswith(suffix)
        }

    def _step(
        self, gx: Tensor, h: Tensor, c: Tensor | None, p: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        if self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        if state is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            h0, c0 = zeros, (zeros if self.has_cell else None)
        elif isinstance(state, tuple):
            h0, c0 = state
        else:
            h0, c0 = state, None
        finals_h, finals_c = [], []
        for k in range(self.num_layers):
            p = self.layer_parameters(k)
            # The input's share of every gate for all timesteps in one matrix product.
            gx = x @ p["weight_ih"].T
            if self.bias:
                gx = gx + p["bias_ih"]
            h, c = h0[k], (c0[k] if c0 is not None else None)
            outputs = []
            for t in range(x.shape[0]):
                h, c = self._step(gx[t], h, c, p)
                outputs.append(h)
            x = torch.stack(outputs)
            finals_h.append(h)
            if c is not None:
                finals_c.append(c)
        h_n = torch.stack(finals_h)
        out = x.transpose(0, 1) if self.batch_first else x
        if self.has_cell:
            return out, (h_n, torch.stack(finals_c))
        return out, h_n


class PeepholeLSTM(_Unfused):
    """LSTM with peephole connections: the gates also look at the cell state.

    ``f_t = σ(W_f [h_{t-1}, x_t] + p_f * C_{t-1} + b_f)``,
    ``i_t = σ(W_i [h_{t-1}, x_t] + p_i * C_{t-1} + b_i)``,
    ``C~_t = tanh(W_C [h_{t-1}, x_t] + b_C)``, ``C_t = f_t * C_{t-1} + i_t * C~_t``,
    ``o_t = σ(W_o [h_{t-1}, x_t] + p_o * C_t + b_o)``, ``h_t = o_t * tanh(C_t)``.

    The peepholes are diagonal (one weight per unit, ``weight_peephole_l{k}`` ordered i, f, o),
    as in Gers and Schmidhuber and in ONNX's ``P`` input. ONNX: ``LSTM`` node with ``P``.
    PyTorch has no such module.
    """

    kind = "peephole_lstm"
    gates = 4
    has_cell = True

    def _extra_parameters(self, layer: int) -> dict[str, tuple[int, ...]]:
        return {f"weight_peephole_l{layer}": (3 * self.hidden_size,)}

    def _step(
        self, gx: Tensor, h: Tensor, c: Tensor | None, p: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        assert c is not None
        g = gx + h @ p["weight_hh"].T
        if self.bias:
            g = g + p["bias_hh"]
        gi, gf, gc, go = g.chunk(4, dim=-1)
        pi, pf, po = p["weight_peephole"].chunk(3)
        i = torch.sigmoid(gi + pi * c)
        f = torch.sigmoid(gf + pf * c)
        c = f * c + i * torch.tanh(gc)
        o = torch.sigmoid(go + po * c)
        return o * torch.tanh(c), c


class GRU(_Unfused):
    """The gated recurrent unit as the paper writes it: reset *before* the linear map, no biases.

    ``z_t = σ(W_z [h_{t-1}, x_t])``, ``r_t = σ(W_r [h_{t-1}, x_t])``,
    ``h~_t = tanh(W [r_t * h_{t-1}, x_t])``, ``h_t = (1 - z_t) * h_{t-1} + z_t * h~_t``.

    The essay's GRU has no bias terms (its LSTM has them), so ``bias`` defaults to False here,
    as for :class:`VanillaRNN`; ``bias=True`` adds ``b_z``, ``b_r``, ``b`` inside each σ/tanh.

    Parameters use PyTorch's GRU layout (gate order r, z, n). ONNX: ``GRU`` node with
    ``linear_before_reset=0``; ONNX's update gate is ``1 - z_t`` of this one, so the exporter
    negates the z rows (σ(-a) = 1 - σ(a) exactly). Compare :class:`TorchGRU`.
    """

    kind = "gru"
    gates = 3

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = False,
        batch_first: bool = False,
    ) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first)

    def _step(
        self, gx: Tensor, h: Tensor, c: Tensor | None, p: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor | None]:
        xr, xz, xn = gx.chunk(3, dim=-1)
        wr, wz, wn = p["weight_hh"].chunk(3)
        br, bz, bn = p["bias_hh"].chunk(3) if self.bias else (0.0, 0.0, 0.0)
        r = torch.sigmoid(xr + h @ wr.T + br)
        z = torch.sigmoid(xz + h @ wz.T + bz)
        candidate = torch.tanh(xn + (r * h) @ wn.T + bn)
        return (1 - z) * h + z * candidate, None


RecurrentModule = VanillaRNN | LSTM | PeepholeLSTM | GRU | TorchGRU

#: The cell kinds rnnserve trains and exports, by the name used in config.toml's ``cell_kind``.
CELLS: dict[str, type[RecurrentModule]] = {
    cls.kind: cls for cls in (VanillaRNN, LSTM, PeepholeLSTM, GRU, TorchGRU)
}


def has_cell_state(kind: str) -> bool:
    """Whether the kind carries ``c`` besides ``h`` (the two LSTMs)."""
    return kind in ("lstm", "peephole_lstm")


def make_cell(
    kind: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool | None = None,
    batch_first: bool = False,
) -> RecurrentModule:
    """A recurrent stack of one kind; ``bias=None`` takes the kind's default (the paper's)."""
    if kind not in CELLS:
        raise ValueError(f"unknown cell kind {kind!r}; expected one of {sorted(CELLS)}")
    cls = CELLS[kind]
    if bias is None:
        return cls(input_size, hidden_size, num_layers, batch_first=batch_first)
    return cls(input_size, hidden_size, num_layers, bias=bias, batch_first=batch_first)
