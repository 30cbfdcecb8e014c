"""Plausible config mistakes: each one is refused at load naming the file and the field, or
served correctly. Never half-served: a config that loads gives every session its own rows.

The graphs are the hand-built single-node models of ``rnnserve.testing`` (input ``x``
(T, N, 4), states (1, N, H), ``Y`` (T, 1, N, H)), some of them edited to make a mistake
possible: dimensions without names, an output that mixes the rows of a batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from rnnserve.models.graph import to_time_major
from rnnserve.server.errors import ConfigError
from rnnserve.server.repository import load_repository
from rnnserve.testing import ServerProcess, build_test_repository, run_reference
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import outputs_of, step, stub_for


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("mistakes"))


def _only(built: Path, tmp_path: Path, name: str) -> Path:
    """A repository holding one model of the test repository (version 1)."""
    repo = tmp_path / "repo"
    shutil.copytree(built / name, repo / name, ignore=shutil.ignore_patterns("2"))
    return repo


def _edit_graph(path: Path, edit) -> None:  # noqa: ANN001
    proto = onnx.load(str(path))
    edit(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _unname_dims(proto: onnx.ModelProto) -> None:
    """Dynamic dimensions without names (what some exporters write): only the run can tell."""
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.Clear()


def _mix_the_batch(proto: onnx.ModelProto) -> None:
    """``Y`` plus its mean over the batch: every session would see the others' data."""
    graph = proto.graph
    for node in graph.node:
        node.output[:] = ["Y_own" if o == "Y" else o for o in node.output]
    graph.node.append(helper.make_node("ReduceMean", ["Y_own"], ["Y_mean"], axes=[2]))
    graph.node.append(helper.make_node("Add", ["Y_own", "Y_mean"], ["Y"]))
    proto.opset_import[0].version = 14


def _run_backwards(proto: onnx.ModelProto) -> None:
    """The GRU read in reverse: every shape stays, the outputs read the chunk's future."""
    (gru,) = [node for node in proto.graph.node if node.op_type == "GRU"]
    (direction,) = [a for a in gru.attribute if a.name == "direction"] or [
        gru.attribute.add(name="direction", type=onnx.AttributeProto.STRING)
    ]
    direction.s = b"reverse"


def _swap_input_axes(proto: onnx.ModelProto) -> None:
    """Name the input's dims so its batch axis looks like the others' time axis."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_param, dims[1].dim_param = "N", "T"


# (model, config text replaced (old, new) pairs, graph edit or None, field, words in the message)
REFUSED = {
    "batch axis on the num_directions axis of Y": (
        "tiny_gru",
        [("shape = [-1, 1, -1, 7]\nbatch_axis = 2", "shape = [-1, 1, -1, 7]\nbatch_axis = 1")],
        None,
        "outputs[0]",
        "shape[1] = 1",
    ),
    "batch axis on a fixed graph axis written -1": (
        "tiny_gru",
        [("shape = [-1, 1, -1, 7]\nbatch_axis = 2", "shape = [-1, -1, 7, 7]\nbatch_axis = 1")],
        None,
        "outputs[0].batch_axis",
        "fixed extent 1",
    ),
    "state batch axis on the layers axis": (
        "tiny_rnn",
        [("shape = [1, -1, 6]\nbatch_axis = 1", "shape = [-1, 1, 6]\nbatch_axis = 0")],
        None,
        "states[0].batch_axis",
        "fixed extent 1",
    ),
    "time axis on the num_directions axis": (
        "tiny_rnn",
        [
            (
                "shape = [-1, 1, -1, 6]\nbatch_axis = 2\ntime_axis = 0",
                "shape = [-1, -1, -1, 6]\nbatch_axis = 2\ntime_axis = 1",
            )
        ],
        None,
        "outputs[0].time_axis",
        "omit time_axis",
    ),
    "time axis on a state": (
        "tiny_rnn",
        [
            (
                "shape = [1, -1, 6]\nbatch_axis = 1",
                "shape = [1, -1, 6]\nbatch_axis = 1\ntime_axis = 0",
            )
        ],
        None,
        "states[0].time_axis",
        "a state has no time axis",
    ),
    "state output also listed under outputs": (
        "tiny_rnn",
        [
            (
                "[[states]]",
                '[[outputs]]\nname = "Y_h"\ndtype = "float32"\nshape = [1, -1, 6]\n'
                "batch_axis = 1\n\n[[states]]",
            )
        ],
        None,
        "(top level)",
        "is also states[0].output",
    ),
    "state input also listed under inputs": (
        "tiny_rnn",
        [
            (
                "[[outputs]]",
                '[[inputs]]\nname = "initial_h"\ndtype = "float32"\nshape = [1, -1, 6]\n'
                "batch_axis = 1\n\n[[outputs]]",
            )
        ],
        None,
        "(top level)",
        "is also states[0].input",
    ),
    "input batch and time axes swapped (named dims)": (
        "tiny_lstm",
        [("batch_axis = 1\ntime_axis = 0", "batch_axis = 0\ntime_axis = 1")],
        None,
        "inputs[0]",
        "which outputs[0]",
    ),
    "input batch and time axes swapped (unnamed dims)": (
        "tiny_lstm",
        [("batch_axis = 1\ntime_axis = 0", "batch_axis = 0\ntime_axis = 1")],
        _unname_dims,
        "inputs/states",
        "check run",
    ),
    "output batch and time axes swapped (named dims)": (
        "tiny_gru",
        [("batch_axis = 2\ntime_axis = 0", "batch_axis = 0\ntime_axis = 2")],
        None,
        "outputs[0].time_axis",
        "which inputs[0] ('x' axis 1) declares as its batch axis",
    ),
    "output batch axis on its time axis (unnamed dims)": (
        "tiny_gru",
        [("batch_axis = 2\ntime_axis = 0", "batch_axis = 0\ntime_axis = 2")],
        _unname_dims,
        "outputs[0].batch_axis",
        "axis 0 is not its batch axis",
    ),
    "h and c pairs crossed": (
        "tiny_lstm",
        [
            ('output = "Y_c"', 'output = "Y_TMP"'),
            ('output = "Y_h"', 'output = "Y_c"'),
            ('output = "Y_TMP"', 'output = "Y_h"'),
        ],
        None,
        "states[0].output",
        "the graph pairs 'initial_c' with 'Y_c'",
    ),
    "a graph that mixes the sessions of a batch": (
        "tiny_gru",
        [],
        _mix_the_batch,
        "outputs[0].batch_axis",
        "do not keep sessions apart",
    ),
    "a recurrent node that runs backwards": (
        "tiny_gru",
        [],
        _run_backwards,
        "states",
        "runs direction='reverse': it reads the future",
    ),
    "input dims named like another tensor's time axis": (
        "tiny_rnn",
        [],
        _swap_input_axes,
        "inputs[0]",
        "the same graph dimension",
    ),
    "a typo in a field name": (
        "tiny_rnn",
        [("batch_axis = 2", "batch_axes = 2")],
        None,
        "outputs[0].batch_axes",
        "unknown key",
    ),
    "state dtype differs from the graph": (
        "tiny_rnn",
        [
            ("shape = [1, -1, 6]", "shape = [1, -1, 6]"),
            ('dtype = "float32"\nshape = [1, -1, 6]', 'dtype = "float64"\nshape = [1, -1, 6]'),
        ],
        None,
        "states[0].input",
        "config says float64",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_mistake_is_refused_naming_file_and_field(built: Path, tmp_path: Path, case: str) -> None:
    name, replacements, edit, field, words = REFUSED[case]
    repo = _only(built, tmp_path, name)
    config = repo / name / "config.toml"
    text = config.read_text(encoding="utf-8")
    for old, new in replacements:
        assert old in text, f"{case}: the test's config text moved"
        text = text.replace(old, new, 1)
    config.write_text(text, encoding="utf-8")
    if edit is not None:
        _edit_graph(repo / name / "1" / "model.onnx", edit)
    with pytest.raises(ConfigError) as info:
        load_repository(repo).close()
    message = str(info.value)
    assert message.startswith(f"{config}: "), message
    assert f"field {field}" in message, message
    assert words in message, message


def test_server_refuses_to_start_and_says_why(built: Path, tmp_path: Path) -> None:
    repo = _only(built, tmp_path, "tiny_gru")
    config = repo / "tiny_gru" / "config.toml"
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("shape = [-1, 1, -1, 7]", "shape = [-1, -1, 7, 7]", 1))
    config.write_text(config.read_text().replace("batch_axis = 2", "batch_axis = 1", 1))
    process = ServerProcess(repo)
    with pytest.raises(RuntimeError) as info:
        process.start()
    assert "server exited with 2" in str(info.value)
    assert f"{config}: field outputs[0].batch_axis" in str(info.value)


# --- served correctly ----------------------------------------------------------------------


def _layout1_gru(path: Path) -> None:
    """A batch-first GRU (``layout = 1``): x (N, T, 4), h (N, 1, 5), Y (N, T, 1, 5)."""
    rng = np.random.default_rng(3)
    hidden = 5

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.4).astype("f4"), name)

    node = helper.make_node(
        "GRU", ["x", "W", "R", "B", "", "h0"], ["Y", "h1"], hidden_size=hidden, layout=1
    )
    graph = helper.make_graph(
        [node],
        "gru_batch_first",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 4]),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 1, hidden]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "time", 1, hidden]),
            helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["batch", 1, hidden]),
        ],
        [
            weight("W", 1, 3 * hidden, 4),
            weight("R", 1, 3 * hidden, hidden),
            weight("B", 1, 6 * hidden),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    path.parent.mkdir(parents=True)
    # onnxruntime's CPU kernels refuse layout = 1: transposes around a layout-0 node instead,
    # which leaves the graph's inputs and outputs (and so the config) as they are.
    onnx.save(to_time_major(model), str(path))


LAYOUT1_CONFIG = """cell_kind = "gru_torch"

[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, -1, 4]
batch_axis = 0
time_axis = 1

[[outputs]]
name = "Y"
dtype = "float32"
shape = [-1, -1, 1, 5]
batch_axis = 0
time_axis = 1

[[states]]
input = "h0"
output = "h1"
dtype = "float32"
shape = [-1, 1, 5]
batch_axis = 0
"""


def _served_repository(built: Path, root: Path) -> Path:
    """Configs that look unusual but are right: every one must load and serve correctly."""
    # LSTM pairs declared c first, opposite to the graph's order (as the test repository does).
    shutil.copytree(
        built / "tiny_lstm", root / "pairs_in_other_order", ignore=shutil.ignore_patterns("2")
    )
    # Every extent of Y written -1: the static ones come from the graph.
    shutil.copytree(built / "tiny_gru", root / "all_dynamic_output")
    config = root / "all_dynamic_output" / "config.toml"
    config.write_text(
        config.read_text().replace("shape = [-1, 1, -1, 7]", "shape = [-1, -1, -1, -1]")
    )
    # Dimensions without names: the check run proves the declared axes.
    shutil.copytree(built / "tiny_rnn", root / "unnamed_dims")
    _edit_graph(root / "unnamed_dims" / "1" / "model.onnx", _unname_dims)
    # Batch first: layout = 1 puts the batch on axis 0 of every tensor.
    _layout1_gru(root / "batch_first" / "1" / "model.onnx")
    (root / "batch_first" / "config.toml").write_text(LAYOUT1_CONFIG)
    return root


def test_unusual_but_right_configs_are_served_correctly(built: Path, tmp_path: Path) -> None:
    repo = _served_repository(built, tmp_path / "served")
    rng = np.random.default_rng(11)
    with ServerProcess(repo) as server, stub_for(server.address) as stub:
        for name in sorted(p.name for p in repo.iterdir()):
            model = stub.GetModel(pb.GetModelRequest(name=name)).model
            (spec,) = model.inputs
            xs = [
                rng.standard_normal([6 if e == -1 else e for e in spec.shape]).astype("f4")
                for _ in range(3)
            ]
            sessions = [
                stub.OpenSession(pb.OpenSessionRequest(model=name)).session.session_id for _ in xs
            ]
            got: list[list[dict[str, np.ndarray]]] = [[] for _ in xs]
            for t in range(6):  # the three sessions interleaved, one timestep each
                for k, (sid, x) in enumerate(zip(sessions, xs, strict=True)):
                    one = np.take(x, [t], axis=spec.time_axis)
                    got[k].append(outputs_of(step(stub, sid, spec.name, one)))
            for k, x in enumerate(xs):
                want = run_reference(repo, name, "", {spec.name: x})
                for out in model.outputs:
                    value = np.concatenate([g[out.name] for g in got[k]], axis=out.time_axis)
                    np.testing.assert_allclose(value, want[out.name], rtol=1e-5, atol=1e-5)


def test_models_listing_keeps_full_names_when_piped(built: Path) -> None:
    """``rnnserve models | less`` must show what to put in a config, not names cut to fit."""
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "rnnserve.server", "models", "--repository", str(built)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "tiny_gru_torch" in listed.stdout and "peephole_lstm" in listed.stdout
    assert "initial_c->Y_c[1, 8], initial_h->Y_h[1, 8]" in listed.stdout
    assert "…" not in listed.stdout
