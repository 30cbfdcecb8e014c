"""A step whose inputs onnxruntime cannot run fails alone, changes nothing, and fails nobody else.

The model is an LSTM plus a ``Gather`` from a 10-entry table by a per-session index input:
an index out of range makes onnxruntime fail the whole run at run time, which no request
check can see beforehand. The engine runs a failed batch again in halves, so only the step
with the bad index is answered INTERNAL; the other session of its batch is served as if it
had run alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, run_reference
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import assert_close, outputs_of, stub_for

H = 5
CONFIG = f"""
cell_kind = "lstm"
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, -1, 4]
batch_axis = 1
time_axis = 0
[[inputs]]
name = "idx"
dtype = "int64"
shape = [-1]
batch_axis = 0
[[outputs]]
name = "Y"
dtype = "float32"
shape = [-1, 1, -1, {H}]
batch_axis = 2
time_axis = 0
[[outputs]]
name = "g"
dtype = "float32"
shape = [-1]
batch_axis = 0
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


def _model() -> bytes:
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [w("W", 1, 4 * H, 4), w("R", 1, 4 * H, H), w("B", 1, 8 * H), w("table", 10)]
    nodes = [
        helper.make_node(
            "LSTM", ["x", "W", "R", "B", "", "initial_h", "initial_c"], ["Y", "Y_h", "Y_c"],
            hidden_size=H,
        ),
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
    ]  # fmt: skip
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "gather_lstm",
        [
            helper.make_tensor_value_info("x", f, ["T", "N", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("initial_h", f, [1, "N", H]),
            helper.make_tensor_value_info("initial_c", f, [1, "N", H]),
        ],
        [
            helper.make_tensor_value_info("Y", f, ["T", 1, "N", H]),
            helper.make_tensor_value_info("g", f, ["N"]),
            helper.make_tensor_value_info("Y_h", f, [1, "N", H]),
            helper.make_tensor_value_info("Y_c", f, [1, "N", H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def gather_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("gather")
    (root / "gather_lstm" / "1").mkdir(parents=True)
    (root / "gather_lstm" / "1" / "model.onnx").write_bytes(_model())
    (root / "gather_lstm" / "config.toml").write_text(CONFIG)
    with ServerProcess(root) as process:
        yield process, root


def _step(sid: str, x: np.ndarray, idx: int, rid: str) -> pb.StepRequest:
    inputs = {"x": from_array(x), "idx": from_array(np.asarray(idx, np.int64))}
    return pb.StepRequest(session_id=sid, request_id=rid, inputs=inputs)


def test_failed_run_changes_no_session_of_its_batch(gather_server) -> None:  # noqa: ANN001
    process, root = gather_server
    rng = np.random.default_rng(1)
    first, second = (rng.standard_normal((2, 4)).astype(np.float32) for _ in range(2))
    with stub_for(process.address) as stub:
        a = stub.OpenSession(pb.OpenSessionRequest(model="gather_lstm")).session.session_id
        b = stub.OpenSession(pb.OpenSessionRequest(model="gather_lstm")).session.session_id
        stub.Step(_step(a, first, 1, "warm"))
        message = pb.StreamStepsRequest(steps=[_step(a, second, 3, "a"), _step(b, second, 99, "b")])
        results = {r.request_id: r for m in stub.StreamSteps(iter([message])) for r in m.results}
        assert results["a"].response.position == 4
        assert results["b"].error.code == grpc.StatusCode.INTERNAL.value[0]
        assert results["b"].error.reason == "INTERNAL"
        positions = [
            stub.GetSession(pb.GetSessionRequest(session_id=s)).session.position for s in (a, b)
        ]
        assert positions == [4, 0]
        got_a = outputs_of(stub.Step(_step(a, second, 3, "a2")))
        got_b = outputs_of(stub.Step(_step(b, second, 4, "b2")))
    after_a = np.concatenate([first, second, second])
    for got, x, idx in ((got_a, after_a, 3), (got_b, second, 4)):
        want = run_reference(root, "gather_lstm", "1", {"x": x, "idx": np.asarray(idx, np.int64)})
        assert_close({"Y": got["Y"]}, {"Y": want["Y"][-2:]})
        assert_close({"g": got["g"]}, {"g": want["g"]})
