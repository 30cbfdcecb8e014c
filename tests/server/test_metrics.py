"""What /metrics says about calls, runs, queues and versions, on real servers over loopback.

Some servers here run in this process (the engine and one frontend, as ``rnnserve serve``
wires them) so a test can drain the frontend or slow a model's runs and read the registry
the metrics endpoint serves; the others are ``rnnserve serve`` processes, scraped.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.server.engine.core import Engine
from rnnserve.server.frontend.limits import ConnectionLimits
from rnnserve.server.frontend.security import TokenTable
from rnnserve.server.frontend.server import Frontend, FrontendOptions, start_frontend
from rnnserve.server.frontend.tensors import from_array
from rnnserve.server.repository import load_repository
from rnnserve.testing import ServerProcess
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import metric, running_engine, slow_runs

TOKEN = "alice-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
STEP = "/rnnserve.v1.InferenceService/Step"
RECEIVE_LIMIT = 4096  # bytes: a step of 2,000 timesteps of tiny_rnn is far over it


@asynccontextmanager
async def in_process_server(
    repository: Path, *, tokens: bool = False, body_timeout_s: float = 30.0
) -> AsyncIterator[tuple[Engine, Frontend, str]]:
    """An engine and one frontend on a loopback port, in this process (as ``serve`` builds
    them with one frontend); stopped after the block."""
    async with running_engine(load_repository(repository)) as engine:
        options = FrontendOptions(
            host="127.0.0.1",
            port=0,
            max_message_bytes=RECEIVE_LIMIT,
            tokens=TokenTable({"alice": TOKEN}) if tokens else None,
            limits=ConnectionLimits(body_timeout_s=body_timeout_s),
        )
        frontend = await start_frontend(engine, engine.metrics, options)
        try:
            yield engine, frontend, f"127.0.0.1:{frontend.port}"
        finally:
            await frontend.stop(0)


def _requests(engine: Engine, method: str, code: str, model: str = "") -> float:
    value = engine.metrics.registry.get_sample_value(
        "rnnserve_requests_total", {"method": method, "model": model, "code": code}
    )
    return value or 0.0


async def _counted(engine: Engine, method: str, code: str, want: float) -> float:
    """The count, once it is ``want`` (or after 5 s): gRPC may answer a call it ended itself
    (a message over the limit) before the server's handler has seen the end."""
    deadline = time.monotonic() + 5
    while _requests(engine, method, code) != want and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return _requests(engine, method, code)


async def _code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _raw(channel: grpc.aio.Channel, method: str = STEP) -> Any:
    return channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


async def test_calls_refused_before_their_handler_runs_are_counted(test_repository: Path) -> None:
    """A missing token, an unreadable, oversized, absent or late message, and a draining
    server each refuse a call before its handler runs: counted all the same, method and code
    (model "": the request was not read, or not by the handler)."""
    async with (
        in_process_server(test_repository, tokens=True, body_timeout_s=0.5) as (engine, fe, at),
        grpc.aio.insecure_channel(at) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        opened = stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
        assert await _code_of(opened) == grpc.StatusCode.UNAUTHENTICATED
        assert await _counted(engine, "OpenSession", "UNAUTHENTICATED", 1) == 1

        garbage = _raw(channel)(b"\xff" * 64, metadata=AUTH, timeout=10)
        assert await _code_of(garbage) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _counted(engine, "Step", "INVALID_ARGUMENT", 1) == 1
        empty = channel.stream_unary(STEP, request_serializer=bytes)(iter(()), metadata=AUTH)
        assert await _code_of(empty) == grpc.StatusCode.INVALID_ARGUMENT
        assert await _counted(engine, "Step", "INVALID_ARGUMENT", 2) == 2

        x = from_array(np.zeros((2000, 4), np.float32))
        big = stub.Step(pb.StepRequest(session_id="s", inputs={"x": x}), metadata=AUTH)
        assert await _code_of(big) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _counted(engine, "Step", "RESOURCE_EXHAUSTED", 1) == 1

        never = asyncio.Event()

        async def nothing() -> AsyncIterator[bytes]:
            await never.wait()
            yield b""

        late = channel.stream_unary(STEP, request_serializer=bytes)(
            nothing(), metadata=AUTH, timeout=10
        )
        assert await _code_of(late) == grpc.StatusCode.DEADLINE_EXCEEDED
        never.set()
        assert await _counted(engine, "Step", "DEADLINE_EXCEEDED", 1) == 1

        await fe.begin_drain()
        listed = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH)
        assert await _code_of(listed) == grpc.StatusCode.UNAVAILABLE
        assert await _counted(engine, "ListModels", "UNAVAILABLE", 1) == 1
        stream = stub.StreamSteps(iter(()), metadata=AUTH)
        with pytest.raises(grpc.aio.AioRpcError) as drained:
            async for _ in stream:
                pass
        assert drained.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await _counted(engine, "StreamSteps", "UNAVAILABLE", 1) == 1
        index = admin_grpc.AdminServiceStub(channel).RepositoryIndex(
            admin_pb.RepositoryIndexRequest(), metadata=AUTH
        )
        assert await _code_of(index) == grpc.StatusCode.UNAVAILABLE
        assert await _counted(engine, "RepositoryIndex", "UNAVAILABLE", 1) == 1

        # A method that does not exist is no rnnserve call: never a label.
        unknown = _raw(channel, "/rnnserve.v1.InferenceService/NoSuchMethod")(b"", timeout=10)
        assert await _code_of(unknown) == grpc.StatusCode.UNAUTHENTICATED
        samples = engine.metrics.registry.collect()
        methods = {
            s.labels["method"]
            for family in samples
            if family.name == "rnnserve_requests"
            for s in family.samples
        }
        assert "NoSuchMethod" not in methods


def test_predict_runs_are_observed_as_inference_time(server: ServerProcess) -> None:
    def runs() -> float:
        samples = metric(server.metrics_port, "rnnserve_inference_seconds_count")
        return sum(v for k, v in samples.items() if 'model="tiny_gru"' in k)

    before = runs()
    x = from_array(np.zeros((5, 4), np.float32))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(2):
            stub.Predict(pb.PredictRequest(model="tiny_gru", inputs={"x": x}), timeout=30)
    assert runs() == before + 2


async def test_queue_depth_follows_the_queue_between_batches(
    test_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps queued while a batch runs show at once, not when the next batch starts; and
    the gauge is back at 0 once they are answered."""

    def depth() -> float | None:
        return engine.metrics.registry.get_sample_value(
            "rnnserve_queue_depth", {"model": "tiny_rnn", "version": "1"}
        )

    async with (
        in_process_server(test_repository) as (engine, _, at),
        grpc.aio.insecure_channel(at) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        ids = [
            (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))).session.session_id
            for _ in range(4)
        ]
        slow_runs(monkeypatch, engine, "tiny_rnn:1", 0.5)
        batcher = engine.batchers["tiny_rnn:1"]
        x = {"x": from_array(np.zeros((1, 4), np.float32))}
        first = asyncio.ensure_future(stub.Step(pb.StepRequest(session_id=ids[0], inputs=x)))
        while not batcher.has_steps_of(("anonymous", ids[0])):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the first batch is on the model's thread now
        rest = [
            asyncio.ensure_future(stub.Step(pb.StepRequest(session_id=sid, inputs=x)))
            for sid in ids[1:]
        ]
        deadline = time.monotonic() + 5
        while depth() != 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert depth() == 3, "steps queued behind a running batch are not shown"
        assert not first.done()
        await asyncio.gather(first, *rest)
        assert depth() == 0


@pytest.fixture
def frontends_repository(test_repository: Path, tmp_path: Path) -> Iterator[Path]:
    repo = Path(shutil.copytree(test_repository, tmp_path / "repo"))
    spare = tmp_path / "spare-3"
    shutil.copytree(repo / "tiny_lstm" / "2", spare)
    yield repo


def test_model_info_follows_versions_with_several_frontends(frontends_repository: Path) -> None:
    """With frontend processes, /metrics is served by the engine's process from every
    process' files: a retired version's model_info must leave (not stay at 0), and a version
    loaded at run time must show 1."""
    repo = frontends_repository

    def info() -> dict[str, float]:
        samples = metric(server.metrics_port, "rnnserve_model_info")
        return {
            version: value
            for key, value in samples.items()
            if 'model="tiny_lstm"' in key
            for version in ("1", "2", "3")
            if f'version="{version}"' in key
        }

    with (
        ServerProcess(repo, "--frontends", "2") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        admin = admin_grpc.AdminServiceStub(channel)
        assert info() == {"1": 1.0, "2": 1.0}
        retired = admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="1"))
        assert retired.version.state == admin_pb.RETIRED
        assert info() == {"2": 1.0}
        shutil.copytree(repo.parent / "spare-3", repo / "tiny_lstm" / "3")
        for version in ("1", "3"):
            (loaded,) = admin.LoadModel(
                admin_pb.LoadModelRequest(model="tiny_lstm", version=version)
            ).versions
            assert loaded.state == admin_pb.READY, loaded.reason
        assert info() == {"1": 1.0, "2": 1.0, "3": 1.0}
        admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="3"))
        assert info() == {"1": 1.0, "2": 1.0}
        # queue_depth is read from the engine too: one series per loaded version.
        depths = metric(server.metrics_port, "rnnserve_queue_depth")
        assert depths['{model="tiny_lstm",version="2"}'] == 0
        assert not [key for key in depths if 'model="tiny_lstm",version="3"' in key]
