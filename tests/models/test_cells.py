"""Each cell computes the equations in its docstring, checked step by step against NumPy.

The NumPy code below is written from the equations (named gates, the paper's notation), not
from another PyTorch module; the cells' parameters are only read, in PyTorch's gate layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rnnserve.models.cells import CELLS, GRU, LSTM, PeepholeLSTM, TorchGRU, VanillaRNN, make_cell


def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def params(module: torch.nn.Module, layer: int, gates: int) -> dict[str, list[np.ndarray]]:
    """This layer's weights split per gate, as float64 arrays (zero biases when it has none)."""

    def get(name: str, rows: int) -> list[np.ndarray]:
        value = getattr(module, f"{name}_l{layer}", None)
        if value is None:
            return [np.zeros(rows // gates)] * gates
        return np.split(value.detach().double().numpy(), gates)

    rows = getattr(module, f"weight_ih_l{layer}").shape[0]
    return {
        "W_x": get("weight_ih", rows),
        "W_h": get("weight_hh", rows),
        "b_x": get("bias_ih", rows),
        "b_h": get("bias_hh", rows),
    }


def numpy_rnn(p, x, h, c):
    (w_hx,), (w_hh,), (b_x,), (b_h,) = p["W_x"], p["W_h"], p["b_x"], p["b_h"]
    return np.tanh(w_hh @ h + w_hx @ x + b_x + b_h), None


def numpy_lstm(p, x, h, c, peep=None):
    w_i, w_f, w_c, w_o = (
        p["W_x"][k] @ x + p["W_h"][k] @ h + p["b_x"][k] + p["b_h"][k] for k in range(4)
    )
    p_i, p_f, p_o = peep if peep is not None else (0.0, 0.0, 0.0)
    f = sigmoid(w_f + p_f * c)
    i = sigmoid(w_i + p_i * c)
    c_tilde = np.tanh(w_c)
    c_new = f * c + i * c_tilde
    o = sigmoid(w_o + p_o * c_new)
    return o * np.tanh(c_new), c_new


def numpy_gru_paper(p, x, h, c):
    # PyTorch layout: gate order r, z, n.
    r = sigmoid(p["W_x"][0] @ x + p["b_x"][0] + p["W_h"][0] @ h + p["b_h"][0])
    z = sigmoid(p["W_x"][1] @ x + p["b_x"][1] + p["W_h"][1] @ h + p["b_h"][1])
    h_tilde = np.tanh(p["W_x"][2] @ x + p["b_x"][2] + p["W_h"][2] @ (r * h) + p["b_h"][2])
    return (1 - z) * h + z * h_tilde, None


def numpy_gru_torch(p, x, h, c):
    r = sigmoid(p["W_x"][0] @ x + p["b_x"][0] + p["W_h"][0] @ h + p["b_h"][0])
    z = sigmoid(p["W_x"][1] @ x + p["b_x"][1] + p["W_h"][1] @ h + p["b_h"][1])
    n = np.tanh(p["W_x"][2] @ x + p["b_x"][2] + r * (p["W_h"][2] @ h + p["b_h"][2]))
    return (1 - z) * n + z * h, None


GATES = {"rnn": 1, "lstm": 4, "peephole_lstm": 4, "gru": 3, "gru_torch": 3}


def numpy_step(module, kind: str, layer: int, x, h, c):
    p = params(module, layer, GATES[kind])
    if kind == "rnn":
        return numpy_rnn(p, x, h, c)
    if kind == "lstm":
        return numpy_lstm(p, x, h, c)
    if kind == "peephole_lstm":
        peep = np.split(getattr(module, f"weight_peephole_l{layer}").detach().double().numpy(), 3)
        return numpy_lstm(p, x, h, c, peep)
    if kind == "gru":
        return numpy_gru_paper(p, x, h, c)
    return numpy_gru_torch(p, x, h, c)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cell_follows_its_equations_step_by_step(kind: str, layers: int, bias: bool) -> None:
    torch.manual_seed(1)
    module = make_cell(kind, input_size=3, hidden_size=5, num_layers=layers, bias=bias)
    lstm = kind in ("lstm", "peephole_lstm")
    T, B = 6, 2
    x = torch.randn(T, B, 3)
    h0 = torch.randn(layers, B, 5)
    c0 = torch.randn(layers, B, 5)
    with torch.no_grad():
        y, state = module(x, (h0, c0) if lstm else h0)
    h_n, c_n = state if lstm else (state, None)
    for b in range(B):
        inputs = x[:, b].double().numpy()
        for layer in range(layers):
            h = h0[layer, b].double().numpy()
            c = c0[layer, b].double().numpy()
            outputs = []
            for t in range(T):
                h, c_next = numpy_step(module, kind, layer, inputs[t], h, c)
                c = c_next if c_next is not None else c
                outputs.append(h)
            inputs = np.stack(outputs)
            np.testing.assert_allclose(h_n[layer, b].numpy(), h, atol=1e-5)
            if lstm:
                np.testing.assert_allclose(c_n[layer, b].numpy(), c, atol=1e-5)
        np.testing.assert_allclose(y[:, b].numpy(), inputs, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_batch_first_is_the_same_computation_transposed(kind: str) -> None:
    torch.manual_seed(2)
    time_first = make_cell(kind, 3, 4, num_layers=2)
    batch_first = make_cell(kind, 3, 4, num_layers=2, batch_first=True)
    batch_first.load_state_dict(time_first.state_dict())
    x = torch.randn(5, 3, 3)
    with torch.no_grad():
        y_time, _ = time_first(x)
        y_batch, _ = batch_first(x.transpose(0, 1).contiguous())
    torch.testing.assert_close(y_batch.transpose(0, 1), y_time)


def test_carrying_the_state_equals_one_long_sequence() -> None:
    torch.manual_seed(3)
    for kind in sorted(CELLS):
        module = make_cell(kind, 2, 4)
        x = torch.randn(9, 2, 2)
        with torch.no_grad():
            whole, final = module(x)
            first, state = module(x[:4])
            second, carried = module(x[4:], state)
        torch.testing.assert_close(torch.cat([first, second]), whole)
        for a, b in zip(
            torch.utils._pytree.tree_leaves(carried),
            torch.utils._pytree.tree_leaves(final),
            strict=True,
        ):
            torch.testing.assert_close(a, b)


def test_the_two_grus_are_different_functions_with_the_same_weights() -> None:
    """The paper's GRU and PyTorch's differ only in where the reset gate acts."""
    torch.manual_seed(4)
    paper, torch_form = GRU(3, 4, bias=True), TorchGRU(3, 4)
    paper.load_state_dict(torch_form.state_dict())
    x, h0 = torch.randn(5, 2, 3), torch.randn(1, 2, 4)
    with torch.no_grad():
        assert not torch.allclose(paper(x, h0)[0], torch_form(x, h0)[0], atol=1e-3)


def test_paper_defaults_and_kinds() -> None:
    assert VanillaRNN(2, 3).bias is False  # the paper's RNN has no bias
    assert GRU(2, 3).bias is False  # nor has the essay's GRU
    assert not any("bias" in name for name, _ in GRU(2, 3).named_parameters())
    assert LSTM(2, 3).bias and PeepholeLSTM(2, 3).bias
    assert {cls.kind for cls in CELLS.values()} == {
        "rnn",
        "lstm",
        "peephole_lstm",
        "gru",
        "gru_torch",
    }
    with pytest.raises(ValueError, match="unknown cell kind"):
        make_cell("transformer", 2, 3)
