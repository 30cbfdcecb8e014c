"""What operators see: health, reflection, metrics, the port file, SIGTERM, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rnnserve.testing import TEST_MODELS, ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import metric, step, stub_for


def test_health_overall_and_per_model(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", *TEST_MODELS):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        try:
            health.Check(health_pb2.HealthCheckRequest(service="no_such_model"))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("unknown service reported healthy")


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "rnnserve.v1.InferenceService",
        "rnnserve.v1.AdminService",
        "grpc.health.v1.Health",
    } <= names


def test_metrics_move_as_requests_are_served(server: ServerProcess) -> None:
    def requests(code: str) -> float:
        samples = metric(server.metrics_port, "rnnserve_requests_total")
        return sum(
            v
            for k, v in samples.items()
            if 'method="Step"' in k and 'model="tiny_rnn"' in k and f'code="{code}"' in k
        )

    ok, bad = requests("OK"), requests("INVALID_ARGUMENT")
    with stub_for(server.address) as stub:
        sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn")).session.session_id
        active = metric(server.metrics_port, "rnnserve_active_sessions")
        assert sum(v for k, v in active.items() if "tiny_rnn" in k) >= 1
        for _ in range(3):
            step(stub, sid, "x", np.zeros((1, 4), np.float32))
        try:
            step(stub, sid, "x", np.zeros((1, 3), np.float32))
        except grpc.RpcError:
            pass
    assert requests("OK") == ok + 3
    assert requests("INVALID_ARGUMENT") == bad + 1
    for name in (
        "rnnserve_step_latency_seconds_count",
        "rnnserve_queue_delay_seconds_count",
        "rnnserve_inference_seconds_count",
    ):
        assert sum(v for k, v in metric(server.metrics_port, name).items() if "tiny_rnn" in k) >= 3


def test_port_file_and_sigterm(test_repository) -> None:  # noqa: ANN001
    process = ServerProcess(test_repository)
    with process:
        ports = json.loads(process.port_file.read_text())
        assert ports["pid"] == process.process.pid
        assert ports["grpc_port"] == process.grpc_port > 0
        with stub_for(process.address) as stub:
            assert stub.ListModels(pb.ListModelsRequest()).models
        process.process.send_signal(signal.SIGTERM)
        assert process.process.wait(30) == 0
    log = process.final_stderr
    assert "event=start" in log
    assert "event=stop" in log


def test_bad_repository_fails_at_start_naming_file_and_field(test_repository, tmp_path) -> None:  # noqa: ANN001
    import shutil

    repo = shutil.copytree(test_repository, tmp_path / "repo")
    config = repo / "tiny_gru" / "config.toml"
    config.write_text(config.read_text().replace('name = "x"', 'name = "input"', 1))
    result = subprocess.run(
        [sys.executable, "-m", "rnnserve.server", "serve", "--repository", str(repo),
         "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "inputs[0].name" in result.stderr


def test_models_command_lists_the_repository(test_repository) -> None:  # noqa: ANN001
    result = subprocess.run(
        [sys.executable, "-m", "rnnserve.server", "models", "--repository", str(test_repository)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in TEST_MODELS:
        assert name in result.stdout


def test_models_are_described_with_per_session_shapes(server: ServerProcess) -> None:
    with stub_for(server.address) as stub:
        listed = stub.ListModels(pb.ListModelsRequest()).models
        assert [(m.name, m.version) for m in listed] == sorted(
            (name, v)
            for name in TEST_MODELS
            for v in (["1", "2"] if name == "tiny_lstm" else ["1"])
        )
        model = stub.GetModel(pb.GetModelRequest(name="tiny_lstm")).model
        unknown = None
        try:
            stub.GetModel(pb.GetModelRequest(name="tiny_lstm", version="3"))
        except grpc.RpcError as error:
            unknown = error.code()
    assert unknown == grpc.StatusCode.NOT_FOUND
    assert (model.version, list(model.versions), model.cell_kind) == ("2", ["1", "2"], "lstm")
    (x,) = model.inputs
    assert (x.name, list(x.shape), x.time_axis) == ("x", [-1, 4], 0)
    (y,) = model.outputs
    assert (y.name, list(y.shape), y.time_axis) == ("Y", [-1, 1, 8], 0)
    assert [(s.name, s.input, s.output, list(s.shape)) for s in model.states] == [
        ("initial_c", "initial_c", "Y_c", [1, 8]),
        ("initial_h", "initial_h", "Y_h", [1, 8]),
    ]
    assert model.metadata["test"] == "lstm"
    assert model.providers[-1] == "CPUExecutionProvider"
    assert model.limits.max_sessions == 1000
