"""``rnnserve config infer``: a working config, unedited, from the graph alone.

Graphs exported by torch (1 and 2 layers, batch-first and not, with and without dimension
names) and graphs built with ``onnx.helper`` (RNN, LSTM, GRU, with ``layout`` 0 and 1) get a
config from :func:`infer_config`; all of them are then served by one real server, stepped
one timestep per ``Step`` and compared with onnxruntime running the whole sequence.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from rnnserve.client import Client
from rnnserve.models.export import export
from rnnserve.models.graph import batch_first_nodes, infer_config, to_time_major
from rnnserve.models.streaming import CausalConvGRU
from rnnserve.testing import ServerProcess, run_reference
from torch import nn

HIDDEN, FEATURES = 5, 3


class _Wrapped(nn.Module):
    """(x, *state) -> (readout(y), *state) around a torch recurrent layer."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        self.readout = nn.Linear(rnn.hidden_size, 2)

    def forward(self, x: torch.Tensor, *state: torch.Tensor):  # noqa: ANN201
        y, new = self.rnn(x, tuple(state) if len(state) == 2 else state[0])
        new = new if isinstance(new, tuple) else (new,)
        return (self.readout(y), *new)


def _torch_graph(rnn: nn.RNNBase, names: bool) -> onnx.ModelProto:
    torch.manual_seed(0)
    batch, time = (0, 1) if rnn.batch_first else (1, 0)
    x = torch.randn((2, 4, FEATURES) if rnn.batch_first else (4, 2, FEATURES))
    states = 2 if isinstance(rnn, nn.LSTM) else 1
    state = [torch.zeros(rnn.num_layers, 2, HIDDEN) for _ in range(states)]
    state_in = ["h0", "c0"][:states]
    state_out = ["h1", "c1"][:states]
    dynamic = {"x": {batch: "batch", time: "time"}, "y": {batch: "batch", time: "time"}}
    dynamic.update({n: {1: "batch"} for n in [*state_in, *state_out]})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Wrapped(rnn).eval(),
            (x, *state),
            buffer,
            dynamo=False,
            input_names=["x", *state_in],
            output_names=["y", *state_out],
            dynamic_axes=dynamic,
            opset_version=17,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if not names:  # dynamic dimensions without names: only the nodes' semantics tell
        for value in [*proto.graph.input, *proto.graph.output]:
            for dim in value.type.tensor_type.shape.dim:
                if dim.dim_param:
                    dim.Clear()
    return proto


def _helper_graph(op: str, layout: int) -> onnx.ModelProto:
    """One native recurrent node, no readout: x, initial state(s) in; Y and Y_h (Y_c) out."""
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    rng = np.random.default_rng(gates + 10 * layout)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype("f4"), name)

    b, t = ("N", "T") if layout else ("T", "N")  # axis 0, axis 1
    state = ["N", 1, HIDDEN] if layout else [1, "N", HIDDEN]
    y = ["N", "T", 1, HIDDEN] if layout else ["T", 1, "N", HIDDEN]
    lstm = op == "LSTM"
    node = helper.make_node(
        op,
        ["x", "W", "R", "B", "", "h_in", *(["c_in"] if lstm else [])],
        ["Y", "h_out", *(["c_out"] if lstm else [])],
        hidden_size=HIDDEN,
        layout=layout,
    )
    graph = helper.make_graph(
        [node],
        f"{op.lower()}_layout{layout}",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, t, FEATURES]),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, state),
            *([helper.make_tensor_value_info("c_in", TensorProto.FLOAT, state)] if lstm else []),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, y),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, state),
            *([helper.make_tensor_value_info("c_out", TensorProto.FLOAT, state)] if lstm else []),
        ],
        [
            weight("W", 1, gates * HIDDEN, FEATURES),
            weight("R", 1, gates * HIDDEN, HIDDEN),
            weight("B", 1, 2 * gates * HIDDEN),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


GRAPHS = {
    "torch_lstm_1_layer": lambda: _torch_graph(nn.LSTM(FEATURES, HIDDEN), names=True),
    "torch_lstm_2_layers_batch_first": lambda: _torch_graph(
        nn.LSTM(FEATURES, HIDDEN, 2, batch_first=True), names=True
    ),
    "torch_gru_2_layers_unnamed": lambda: _torch_graph(nn.GRU(FEATURES, HIDDEN, 2), names=False),
    "torch_rnn_batch_first_unnamed": lambda: _torch_graph(
        nn.RNN(FEATURES, HIDDEN, batch_first=True), names=False
    ),
    **{
        f"helper_{op.lower()}_layout{layout}": (
            lambda op=op, layout=layout: _helper_graph(op, layout)
        )
        for op in ("RNN", "LSTM", "GRU")
        for layout in (0, 1)
    },
}

#: (batch_axis, time_axis) the config must give x, and the state pairs by name.
EXPECTED = {
    "torch_lstm_1_layer": ((1, 0), {"h0": "h1", "c0": "c1"}),
    "torch_lstm_2_layers_batch_first": ((0, 1), {"h0": "h1", "c0": "c1"}),
    "torch_gru_2_layers_unnamed": ((1, 0), {"h0": "h1"}),
    "torch_rnn_batch_first_unnamed": ((0, 1), {"h0": "h1"}),
}


@pytest.fixture(scope="module")
def inferred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of every graph with its inferred config, written unedited."""
    repository = tmp_path_factory.mktemp("inferred")
    for name, build in GRAPHS.items():
        proto = build()
        result = infer_config(proto)
        assert result.todo == [], (name, result.todo)
        if batch_first_nodes(proto):
            # onnxruntime's CPU kernels refuse layout = 1; the rewrite keeps inputs and
            # outputs, so the config inferred from the original serves the rewritten graph.
            rewritten = to_time_major(proto)
            assert infer_config(rewritten).text.splitlines()[1:] == result.text.splitlines()[1:]
            _assert_same_as_reference(proto, rewritten)
            proto = rewritten
        (repository / name / "1").mkdir(parents=True)
        onnx.save(proto, str(repository / name / "1" / "model.onnx"))
        (repository / name / "config.toml").write_text(result.text)
    return repository


def _assert_same_as_reference(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> None:
    """The rewritten graph in onnxruntime == the layout-1 original in ONNX's reference."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = {}
    for value in original.graph.input:
        dims = [
            d.dim_value or (3 if d.dim_param == "N" else 4)
            for d in value.type.tensor_type.shape.dim
        ]
        feeds[value.name] = rng.standard_normal(dims).astype("f4")
    want = ReferenceEvaluator(original).run(None, feeds)
    session = ort.InferenceSession(
        rewritten.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for got, expected in zip(session.run(None, feeds), want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_inferred_axes_and_pairs(inferred: Path) -> None:
    for name, ((batch, time), pairs) in EXPECTED.items():
        config = tomllib.loads((inferred / name / "config.toml").read_text())
        (x,) = config["inputs"]
        assert (x["batch_axis"], x["time_axis"]) == (batch, time), name
        assert {s["input"]: s["output"] for s in config["states"]} == pairs, name
    for layout in (0, 1):
        config = tomllib.loads(
            (inferred / f"helper_lstm_layout{layout}" / "config.toml").read_text()
        )
        (y,) = config["outputs"]  # Y: (T, 1, N, H) or (N, T, 1, H)
        assert (y["batch_axis"], y["time_axis"]) == ((0, 1) if layout else (2, 0))
        assert {s["input"]: s["output"] for s in config["states"]} == {
            "h_in": "h_out",
            "c_in": "c_out",
        }
        assert {s["batch_axis"] for s in config["states"]} == {0 if layout else 1}


def test_inferred_configs_serve_stepwise_equal_to_onnxruntime(inferred: Path) -> None:
    steps = 9
    rng = np.random.default_rng(5)
    with ServerProcess(inferred) as server, Client(server.address) as client:
        for name in GRAPHS:
            x = rng.standard_normal((steps, FEATURES)).astype("f4")  # per session: (T, F)
            want = run_reference(inferred, name, "", {"x": x})
            info = client.get_model(name)
            with client.open_session(name) as session:
                outputs = [session.step(x[t : t + 1]) for t in range(steps)]
                state = session.export_state().state
            for spec in info.outputs:
                got = np.concatenate(
                    [o if not isinstance(o, dict) else o[spec.name] for o in outputs],
                    axis=spec.time_axis,
                )
                np.testing.assert_allclose(got, want[spec.name], rtol=1e-5, atol=1e-5, err_msg=name)
            for pair in info.states:
                np.testing.assert_allclose(state[pair.name], want[pair.name], rtol=1e-5, atol=1e-5)


def test_command_says_which_field_to_fill(tmp_path: Path) -> None:
    """State no recurrent node carries (a conv's frames), without export's record: ask."""
    repository = tmp_path / "repository"
    export(CausalConvGRU(features=4, channels=3, kernel_size=3), torch.randn(2, 5, 4),
           repository, "kws", check="none")  # fmt: skip
    model = repository / "kws" / "1" / "model.onnx"
    proto = onnx.load(str(model))
    del proto.metadata_props[:]  # as if another tool had exported it
    onnx.save(proto, str(model))
    command = [sys.executable, "-m", "rnnserve.server", "config", "infer", str(model)]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "exists" in refused.stderr
    done = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "states[1].output: 'state0' looks like state" in done.stderr
    assert "candidates of its shape: ['state0_next']" in done.stderr
    config = (repository / "kws" / "config.toml").read_text()
    assert 'output = ""  # FILL' in config
    # Filled in, it serves: the command checks it the way the server loads it.
    (repository / "kws" / "config.toml").unlink()
    filled = config.replace('output = ""  # FILL', 'output = "state0_next"')
    onnx.save(onnx.load(str(model)), str(model))
    (repository / "kws" / "config.toml").write_text(filled)
    with ServerProcess(repository) as server, Client(server.address) as client:
        with client.open_session("kws") as session:
            assert session.step(np.zeros((2, 4), "f4")).shape == (2, 12)


def test_command_checks_what_it_wrote(tmp_path: Path) -> None:
    model = tmp_path / "mine" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    onnx.save(_helper_graph("GRU", 1), str(model))
    command = [sys.executable, "-m", "rnnserve.server", "config", "infer", str(model)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "--time-major" in done.stderr  # layout = 1: said, not checked
    done = subprocess.run(
        [*command, "--force", "--time-major"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked: the server loads it" in done.stdout
    assert (tmp_path / "mine" / "config.toml").is_file()


def test_a_time_axis_it_cannot_tell_is_left_for_the_user_and_refused_until_filled(
    tmp_path: Path,
) -> None:
    # It wrote `time_axis = -1  # FILL`: -1 is a valid "no time axis", so the server loaded it.
    from rnnserve.server.errors import ConfigError
    from rnnserve.server.repository import load_repository

    class Attention(nn.Module):  # (B, T, T): two axes that could be time
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(3, 4)

        def forward(self, x: torch.Tensor, h: torch.Tensor):  # noqa: ANN201
            y, h = self.gru(x, h)
            yb = y.transpose(0, 1)
            return yb @ yb.transpose(1, 2), h

    model = tmp_path / "att" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes
        _export_attention(Attention().eval(), model)
    command = [sys.executable, "-m", "rnnserve.server", "config", "infer", str(model)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "outputs[0].time_axis" in done.stderr
    assert 'time_axis = "FILL"' in (tmp_path / "att" / "config.toml").read_text()
    with pytest.raises(ConfigError, match=r"field outputs\.0\.time_axis|outputs\[0\]\.time_axis"):
        load_repository(tmp_path)


def _export_attention(module: nn.Module, model: Path) -> None:
    torch.onnx.export(
        module,
        (torch.randn(5, 2, 3), torch.zeros(1, 2, 4)),
        str(model),
        dynamo=False,
        input_names=["x", "initial_h"],
        output_names=["att", "Y_h"],
        dynamic_axes={
            "x": {0: "time", 1: "batch"},
            "initial_h": {1: "batch"},
            "att": {0: "batch", 1: "time", 2: "time"},
            "Y_h": {1: "batch"},
        },
    )
