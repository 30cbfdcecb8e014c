"""An exported graph computes what the PyTorch model computes, in onnxruntime and in ONNX's
reference evaluator: every cell kind, time-first and batch-first, sequence lengths 1, 7 and 64,
batch sizes 1, 3 and 16, as one whole sequence and as single steps with the state carried from
output to input.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from rnnserve.models.cells import CELLS
from rnnserve.models.network import ModelSpec, SequenceModel, from_torch
from rnnserve.models.onnx_export import graph_names, to_onnx

TOLERANCE = 1e-5


def _model(
    kind: str, tokens: bool, layers: int = 2, seed: int = 0, batch_first: bool = False
) -> SequenceModel:
    torch.manual_seed(seed)
    sizes = {"vocab_size": 13, "embedding_size": 6} if tokens else {"input_size": 4}
    spec = ModelSpec(kind=kind, hidden_size=10, output_size=3, num_layers=layers, **sizes)
    model = SequenceModel(spec, batch_first=batch_first).eval()
    with torch.no_grad():  # larger weights than the initialisation, so the gates saturate too
        for p in model.parameters():
            p.mul_(2.0)
    return model


def _inputs(
    model: SequenceModel, T: int, B: int, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    spec = model.spec
    if spec.tokens:
        x = rng.integers(0, spec.vocab_size, (T, B)).astype(np.int64)
    else:
        x = rng.standard_normal((T, B, spec.input_size)).astype(np.float32)
    shape = (spec.num_layers, B, spec.hidden_size)
    names = graph_names(model)
    state = {name: rng.standard_normal(shape).astype(np.float32) for name, _ in names.state_pairs}
    return x, state


def _torch_run(
    model: SequenceModel, x: np.ndarray, state: dict[str, np.ndarray]
) -> list[np.ndarray]:
    h = torch.from_numpy(state["initial_h"])
    carried = (h, torch.from_numpy(state["initial_c"])) if "initial_c" in state else h
    with torch.no_grad():
        y, final = model(torch.from_numpy(x), carried)
    finals = list(final) if isinstance(final, tuple) else [final]
    return [y.numpy(), *(f.numpy() for f in finals)]


class Runners:
    """The same graph in onnxruntime and in the reference evaluator."""

    def __init__(self, model: SequenceModel) -> None:
        proto = to_onnx(model)
        self.time_axis = 1 if model.batch_first else 0
        self.names = graph_names(model)
        self.outputs = [self.names.output, *(o for _, o in self.names.state_pairs)]
        self.ort = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        self.reference = ReferenceEvaluator(proto)

    def feeds(self, x: np.ndarray, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.names.input: x, **state}

    def run(self, which: str, x: np.ndarray, state: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds = self.feeds(x, state)
        if which == "onnxruntime":
            return self.ort.run(self.outputs, feeds)
        return self.reference.run(self.outputs, feeds)

    def run_stepwise(
        self, which: str, x: np.ndarray, state: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        """One timestep per run; each run's state outputs are the next run's state inputs."""
        ys = []
        axis = self.time_axis
        for t in range(x.shape[axis]):
            y, *finals = self.run(which, np.take(x, [t], axis=axis), state)
            ys.append(y)
            state = {
                name: value for (name, _), value in zip(self.names.state_pairs, finals, strict=True)
            }
        return [np.concatenate(ys, axis=axis), *state.values()]


def _assert_same(got: list[np.ndarray], want: list[np.ndarray], label: str) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, label
        error = float(np.abs(g.astype(np.float64) - w).max())
        assert error <= TOLERANCE, f"{label}: max abs error {error:.2e}"


@pytest.mark.parametrize("tokens", [False, True], ids=["features", "tokens"])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_exported_graph_matches_pytorch(kind: str, tokens: bool) -> None:
    model = _model(kind, tokens)
    runners = Runners(model)
    for T in (1, 7, 64):
        for B in (1, 3, 16):
            x, state = _inputs(model, T, B, seed=T * 100 + B)
            want = _torch_run(model, x, state)
            for which in ("onnxruntime", "reference"):
                _assert_same(
                    runners.run(which, x, state), want, f"{kind} {which} T={T} B={B} whole"
                )
                _assert_same(
                    runners.run_stepwise(which, x, state),
                    want,
                    f"{kind} {which} T={T} B={B} stepwise",
                )


@pytest.mark.parametrize("tokens", [False, True], ids=["features", "tokens"])
@pytest.mark.parametrize("kind", sorted(CELLS))
def test_a_batch_first_model_exports_a_batch_first_graph_with_parity(
    kind: str, tokens: bool
) -> None:
    """``batch_first=True``: the graph takes (B, T, ...) and gives (B, T, O), as the module
    does; the state stays (layers, B, H), as PyTorch keeps it."""
    model = _model(kind, tokens, batch_first=True)
    runners = Runners(model)
    graph = to_onnx(model).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input]
    assert dims[0][:2] == ["N", "T"] and dims[1] == [2, "N", 10], dims
    out = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out == ["N", "T", 3], out
    for T in (1, 7, 64):
        for B in (1, 3, 16):
            time_first, state = _inputs(model, T, B, seed=T * 100 + B)
            x = np.ascontiguousarray(np.swapaxes(time_first, 0, 1))  # (B, T, ...)
            want = _torch_run(model, x, state)
            assert want[0].shape == (B, T, 3)
            for which in ("onnxruntime", "reference"):
                label = f"{kind} batch-first {which} T={T} B={B}"
                _assert_same(runners.run(which, x, state), want, f"{label} whole")
                _assert_same(runners.run_stepwise(which, x, state), want, f"{label} stepwise")


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_exported_graph_uses_the_native_recurrent_node(kind: str) -> None:
    proto = to_onnx(_model(kind, tokens=False, layers=1))
    onnx.checker.check_model(proto, full_check=True)
    (node,) = [n for n in proto.graph.node if n.op_type in ("RNN", "LSTM", "GRU")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    expected_op = {
        "rnn": "RNN",
        "lstm": "LSTM",
        "peephole_lstm": "LSTM",
        "gru": "GRU",
        "gru_torch": "GRU",
    }
    assert node.op_type == expected_op[kind]
    if kind == "peephole_lstm":
        assert len(node.input) == 8 and node.input[7], "the peephole LSTM feeds the P input"
    if kind in ("gru", "gru_torch"):
        assert attrs["linear_before_reset"] == (1 if kind == "gru_torch" else 0)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    assert inputs[0] == "x" and "initial_h" in inputs and "Y_h" in outputs
    assert ("initial_c" in inputs) == (kind in ("lstm", "peephole_lstm"))
    time_axis, batch_axis = proto.graph.input[0].type.tensor_type.shape.dim[:2]
    assert time_axis.dim_param and batch_axis.dim_param, "time and batch axes are dynamic"


def test_a_model_trained_with_pytorch_modules_exports_with_parity() -> None:
    """``from_torch`` wraps nn.LSTM / nn.GRU / nn.RNN without changing what they compute."""
    torch.manual_seed(5)
    for rnn in (torch.nn.LSTM(4, 8, 2), torch.nn.GRU(4, 8), torch.nn.RNN(4, 8, bias=True)):
        readout = torch.nn.Linear(8, 2)
        model = from_torch(rnn, readout)
        x, state = _inputs(model, 7, 3, seed=1)
        h = torch.from_numpy(state["initial_h"])
        initial = (h, torch.from_numpy(state["initial_c"])) if "initial_c" in state else h
        with torch.no_grad():
            hidden, final = rnn(torch.from_numpy(x), initial)
            y = readout(hidden)
        finals = list(final) if isinstance(final, tuple) else [final]
        want = [y.numpy(), *(f.numpy() for f in finals)]
        _assert_same(_torch_run(model, x, state), want, f"{type(rnn).__name__} wrapped")
        _assert_same(Runners(model).run("onnxruntime", x, state), want, type(rnn).__name__)


def test_from_torch_refuses_what_onnx_cannot_carry_step_by_step() -> None:
    with pytest.raises(ValueError, match="bidirectional"):
        from_torch(torch.nn.LSTM(4, 8, bidirectional=True), torch.nn.Linear(16, 2))
    with pytest.raises(ValueError, match="proj_size"):
        from_torch(torch.nn.LSTM(4, 8, proj_size=4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="tanh"):
        from_torch(torch.nn.RNN(4, 8, nonlinearity="relu"), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match="readout takes"):
        from_torch(torch.nn.GRU(4, 8), torch.nn.Linear(5, 2))
