"""Integer inputs with a declared value range: a token id outside it is refused before queueing.

The model is a small character LM: int64 token ids index a 10-row embedding table (a
``Gather``) that feeds an LSTM. onnxruntime's Gather reads a token of -1 as the table's last
row without complaint, and fails the whole run beyond the table. With ``range = [0, 9]`` in
the config, the engine refuses such a step with INVALID_ARGUMENT (``INVALID_TENSOR``) before
it reaches a batch: the session's position and state are unchanged, the other sessions of
the same message are served, and Predict refuses it too. ``rnnserve config infer`` writes the
range from the graph.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rnnserve.models.graph import infer_config
from rnnserve.server.config import load_model_config
from rnnserve.server.errors import ConfigError
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, run_reference
from rnnserve.v1 import inference_service_pb2 as pb
from server.helpers import assert_close, outputs_of, stub_for

H, E, VOCAB = 5, 3, 10
CONFIG = f"""
cell_kind = "lstm"
[[inputs]]
name = "tokens"
dtype = "int64"
shape = [-1, -1]
batch_axis = 1
time_axis = 0
range = [0, {VOCAB - 1}]
[[outputs]]
name = "Y"
dtype = "float32"
shape = [-1, 1, -1, {H}]
batch_axis = 2
time_axis = 0
[[states]]
input = "initial_h"
output = "Y_h"
dtype = "float32"
shape = [1, -1, {H}]
batch_axis = 1
[[states]]
input = "initial_c"
output = "Y_c"
dtype = "float32"
shape = [1, -1, {H}]
batch_axis = 1
[limits]
max_queue_delay_us = 100000
"""


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("W", 1, 4 * H, E), w("R", 1, 4 * H, H), w("B", 1, 8 * H), w("embedding", VOCAB, E)]
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["x"], axis=0),
        helper.make_node(
            "LSTM", ["x", "W", "R", "B", "", "initial_h", "initial_c"], ["Y", "Y_h", "Y_c"],
            hidden_size=H,
        ),
    ]  # fmt: skip
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "token_lstm",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T", "N"]),
            helper.make_tensor_value_info("initial_h", f, [1, "N", H]),
            helper.make_tensor_value_info("initial_c", f, [1, "N", H]),
        ],
        [
            helper.make_tensor_value_info("Y", f, ["T", 1, "N", H]),
            helper.make_tensor_value_info("Y_h", f, [1, "N", H]),
            helper.make_tensor_value_info("Y_c", f, [1, "N", H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _repository(root: Path, config: str = CONFIG) -> Path:
    (root / "token_lstm" / "1").mkdir(parents=True)
    (root / "token_lstm" / "1" / "model.onnx").write_bytes(_model().SerializeToString())
    (root / "token_lstm" / "config.toml").write_text(config, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = _repository(tmp_path_factory.mktemp("tokens"))
    with ServerProcess(root) as process:
        yield process, root


def _step(sid: str, tokens: list[int], rid: str = "") -> pb.StepRequest:
    inputs = {"tokens": from_array(np.asarray(tokens, np.int64))}
    return pb.StepRequest(session_id=sid, request_id=rid, inputs=inputs)


@pytest.mark.parametrize("bad", [-1, VOCAB, -97, 10**9])
def test_a_token_out_of_range_is_refused_before_queueing_and_changes_nothing(
    token_server: tuple[ServerProcess, Path], bad: int
) -> None:
    process, root = token_server
    with stub_for(process.address) as stub:
        a = stub.OpenSession(pb.OpenSessionRequest(model="token_lstm")).session.session_id
        b = stub.OpenSession(pb.OpenSessionRequest(model="token_lstm")).session.session_id
        stub.Step(_step(a, [1, 2]))
        with pytest.raises(grpc.RpcError) as info:
            stub.Step(_step(a, [3, bad]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(bad) in info.value.details() and "0..9" in info.value.details()
        trailers = dict(info.value.trailing_metadata() or ())
        assert trailers.get("rnnserve-error-reason") == "INVALID_TENSOR"
        # On a stream, next to another session's valid step: that one is served.
        message = pb.StreamStepsRequest(steps=[_step(a, [bad], "bad"), _step(b, [4], "good")])
        results = {r.request_id: r for m in stub.StreamSteps(iter([message])) for r in m.results}
        assert results["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert results["bad"].error.reason == "INVALID_TENSOR"
        assert results["good"].response.position == 1
        positions = [
            stub.GetSession(pb.GetSessionRequest(session_id=s)).session.position for s in (a, b)
        ]
        assert positions == [2, 1]
        # The refused steps left a's state as it was: its next step is what a quiet run gives.
        got = outputs_of(stub.Step(_step(a, [3])))
        with pytest.raises(grpc.RpcError) as predicted:
            stub.Predict(
                pb.PredictRequest(
                    model="token_lstm",
                    inputs={"tokens": from_array(np.asarray([0, bad], np.int64))},
                )
            )
        assert predicted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    want = run_reference(root, "token_lstm", "1", {"tokens": np.asarray([1, 2, 3], np.int64)})
    assert_close({"Y": got["Y"]}, {"Y": want["Y"][-1:]})


def test_config_infer_writes_the_range_of_an_embedding_index(tmp_path: Path) -> None:
    inferred = infer_config(_model())
    assert f"range = [0, {VOCAB - 1}]" in inferred.text, inferred.text
    path = tmp_path / "config.toml"
    path.write_text(inferred.text, encoding="utf-8")
    (spec,) = load_model_config(path).inputs
    assert spec.range == (0, VOCAB - 1)


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        (f"range = [0, {VOCAB - 1}]", "range = [9, 0]", "the first bound is the lowest"),
        ('dtype = "int64"', 'dtype = "float32"', "only integer inputs"),
        ('name = "Y"', 'name = "Y"\nrange = [0, 1]', "only [[inputs]] take a range"),
        (f"range = [0, {VOCAB - 1}]", 'range = [0, "z"]', "range"),
    ],
)
def test_a_bad_range_is_refused_at_load_naming_file_and_field(
    tmp_path: Path, old: str, new: str, words: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field "), message
    assert words in message, message


@pytest.mark.parametrize(
    "declared", [[-1, VOCAB - 1], [0, VOCAB], [-5, 2 * VOCAB]], ids=["below", "above", "both"]
)
def test_a_range_reaching_past_the_embedding_table_is_refused_at_load(
    tmp_path: Path, declared: list[int]
) -> None:
    # Loaded as it was, -1 answered the last row's output and VOCAB failed the run INTERNAL.
    from rnnserve.server.repository import load_repository

    config = CONFIG.replace(f"range = [0, {VOCAB - 1}]", f"range = {declared}")
    root = _repository(tmp_path, config)
    with pytest.raises(ConfigError) as info:
        load_repository(root)
    message = str(info.value)
    assert message.startswith(f"{root / 'token_lstm' / 'config.toml'}: field inputs[0].range")
    assert f"rows 0..{VOCAB - 1}" in message, message
