"""Read-your-writes across frontends: once LoadModel or RetireModel returns, through whichever
frontend, every frontend of the server describes the new catalogue (``--frontends 2``).

Each frontend keeps its own copy of the catalogue, which the engine pushes down its pipe.
That push can wait behind whatever else the engine sends that frontend: a frontend busy with
large replies reads them first and meanwhile answers its clients from the catalogue it had.
The tests make that backlog certain rather than lucky: frontend B is paused (SIGSTOP) while
the engine answers its large Predicts, so their replies, then the push, queue on its pipe.
A client that loaded a version through frontend A and then asks B about it must find it
(GetModel, ListModels, its health), and one that retired it must no longer. A client meets
B by opening a new channel after its LoadModel, as the SDK's ``open_session`` does when it
reads the version's description first; here a channel already known to reach B stands for
it, so that B is asked every time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import HIDDEN, ServerProcess, build_test_repository, cell_model
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

WIDE = 256  # wide_rnn's hidden size: a reply is 64 times its request
TIMESTEPS = 2048  # one Predict: 32 KiB in, 2 MiB out (under gRPC's 4 MiB default)
PREDICTS = 16  # tens of MiB of replies queued for the paused frontend
CALL_S = 120.0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The test models and wide_rnn, a model whose replies are far larger than its requests
    (so a frontend forwards its Predicts at once and the engine's replies pile up)."""
    root = build_test_repository(tmp_path / "repo")
    (root / "wide_rnn" / "1").mkdir(parents=True)
    (root / "wide_rnn" / "1" / "model.onnx").write_bytes(cell_model("RNN", WIDE, 99, {}))
    config = (root / "tiny_rnn" / "config.toml").read_text()
    hidden = HIDDEN["tiny_rnn"]
    config = config.replace(f", {hidden}]", f", {WIDE}]")
    (root / "wide_rnn" / "config.toml").write_text(config)
    return root


class Frontend:
    """One frontend process and a channel whose connection it serves."""

    def __init__(self, pid: int, channel: grpc.aio.Channel) -> None:
        self.pid = pid
        self.channel = channel
        self.inference = pb_grpc.InferenceServiceStub(channel)
        self.admin = admin_grpc.AdminServiceStub(channel)
        self.healthcheck = health_pb2_grpc.HealthStub(channel)

    async def describes(self, version: str) -> bool:
        """Whether this frontend's GetModel and ListModels know tiny_lstm's ``version`` (its
        health then SERVING, else unknown: they must agree)."""
        listed = await self.inference.ListModels(pb.ListModelsRequest(), timeout=CALL_S)
        in_list = any(m.name == "tiny_lstm" and m.version == version for m in listed.models)
        try:
            await self.inference.GetModel(
                pb.GetModelRequest(name="tiny_lstm", version=version), timeout=CALL_S
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            found = False
        else:
            found = True
        assert in_list == found, f"ListModels and GetModel disagree on version {version}"
        assert await self.health(f"tiny_lstm:{version}") == (
            health_pb2.HealthCheckResponse.SERVING if found else None
        ), f"health disagrees with GetModel on version {version}"
        return found

    async def health(self, service: str) -> int | None:
        """The service's health on this frontend; None for a name it never had or forgot."""
        try:
            reply = await self.healthcheck.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=CALL_S
            )
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error
            return None
        unknown = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        return None if reply.status == unknown else reply.status


def _frontend_pids(server: ServerProcess) -> list[int]:
    assert server.process is not None
    children = psutil.Process(server.process.pid).children()
    return [c.pid for c in children if any("spawn_main" in part for part in c.cmdline())]


def _client_ports(pid: int, port: int) -> set[int]:
    """The local ports of ``pid``'s connections to ``port`` (the client's end)."""
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.raddr and c.raddr.port == port
    }


def _served_by(pid: int, port: int) -> set[int]:
    """The client ports of the connections frontend ``pid`` serves on ``port``."""
    return {
        c.raddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.raddr and c.laddr.port == port
    }


@asynccontextmanager
async def one_channel_per_frontend(server: ServerProcess) -> AsyncIterator[list[Frontend]]:
    """A connected channel to each frontend process (the kernel picks a frontend for each
    new connection; channels are opened until every frontend has one)."""
    pids = _frontend_pids(server)
    assert len(pids) == 2, pids
    opened: list[grpc.aio.Channel] = []
    found: dict[int, Frontend] = {}
    try:
        for _ in range(200):
            # A subchannel of its own: gRPC would otherwise share one connection between
            # channels to the same address.
            channel = grpc.aio.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            opened.append(channel)
            before = _client_ports(os.getpid(), server.grpc_port)
            await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
            (mine,) = _client_ports(os.getpid(), server.grpc_port) - before
            pid = next(p for p in pids if mine in _served_by(p, server.grpc_port))
            found.setdefault(pid, Frontend(pid, channel))
            if len(found) == len(pids):
                break
        assert len(found) == len(pids), "the kernel never picked one of the frontends"
        yield list(found.values())
    finally:
        for channel in opened:
            await channel.close()


def _predict(timesteps: int) -> pb.PredictRequest:
    x = from_array(np.zeros((timesteps, 4), np.float32))
    return pb.PredictRequest(model="wide_rnn", inputs={"x": x})


@asynccontextmanager
async def paused_behind_replies(
    frontend: Frontend, other: Frontend
) -> AsyncIterator[Callable[[], None]]:
    """``frontend`` paused while the engine answers its large Predicts: the block begins
    once their replies are queued on its pipe, ahead of anything the engine sends it next,
    and is given the function that resumes it (called at the block's end at the latest).
    The block ends once the Predicts are answered."""
    request = _predict(TIMESTEPS)
    predicts = [
        asyncio.ensure_future(frontend.inference.Predict(request, timeout=CALL_S))
        for _ in range(PREDICTS)
    ]
    # Each request is small and forwarded as it arrives; the first answer takes a run.
    await asyncio.wait(predicts, return_when=asyncio.FIRST_COMPLETED)
    os.kill(frontend.pid, signal.SIGSTOP)

    def resume() -> None:
        os.kill(frontend.pid, signal.SIGCONT)

    try:
        # A model runs one call at a time, in order: once a Predict made after the pause is
        # answered, every one that reached the engine before it has been answered too.
        await other.inference.Predict(_predict(1), timeout=CALL_S)
        yield resume
    finally:
        resume()
        await asyncio.gather(*predicts)


async def _engine_reaches(frontend: Frontend, version: str, state: int) -> None:
    """Wait until the engine's index shows tiny_lstm's ``version`` in ``state``."""
    while True:
        reply = await frontend.admin.RepositoryIndex(
            admin_pb.RepositoryIndexRequest(), timeout=CALL_S
        )
        states = {(v.model, v.version): v.state for v in reply.versions}
        if states.get(("tiny_lstm", version)) == state:
            return
        await asyncio.sleep(0.02)


async def test_every_frontend_describes_a_version_once_loadmodel_returns(
    repo: Path, tmp_path: Path
) -> None:
    shutil.move(repo / "tiny_lstm" / "2", tmp_path / "spare-2")  # on disk once serving
    with ServerProcess(repo, "--frontends", "2") as server:
        shutil.move(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        async with one_channel_per_frontend(server) as (a, b):
            assert not await b.describes("2")
            async with paused_behind_replies(b, a) as resume:
                load = asyncio.ensure_future(
                    a.admin.LoadModel(
                        admin_pb.LoadModelRequest(model="tiny_lstm", version="2"), timeout=CALL_S
                    )
                )
                await _engine_reaches(a, "2", admin_pb.READY)
                resume()
                reply = await load
                assert [(v.version, v.state) for v in reply.versions] == [("2", admin_pb.READY)]
                assert await b.describes("2")
                assert await a.describes("2")


async def test_no_frontend_describes_a_version_once_retiremodel_returns(repo: Path) -> None:
    with ServerProcess(repo, "--frontends", "2") as server:
        async with one_channel_per_frontend(server) as (a, b):
            assert await b.describes("2")
            async with paused_behind_replies(b, a) as resume:
                retire = asyncio.ensure_future(
                    a.admin.RetireModel(
                        admin_pb.RetireModelRequest(model="tiny_lstm", version="2"),
                        timeout=CALL_S,
                    )
                )
                await _engine_reaches(a, "2", admin_pb.RETIRED)
                resume()
                await retire
                assert not await b.describes("2")
                assert not await a.describes("2")
