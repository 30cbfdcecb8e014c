"""What a StreamSteps call leaves behind in a frontend process and in the engine once it ends,
with the engine across the pipe (``--frontends`` above 1).

A stream that asks to release its sessions (``close_sessions_on_end``) names each session it
steps to the engine, which closes them when the stream ends (or when the frontend process
dies). Ids answered NOT_FOUND are taken back. Whatever the stream named, its end must reach
the engine: every stream a frontend serves is registered on both sides of the pipe, and one
never ended stays registered there for the life of the frontend process.

The engine and a frontend run in this process, as ``rnnserve serve --frontends 2`` runs each
of them in its own, over the same unix socket and a loopback gRPC port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
from rnnserve.server.engine.ipc import EngineServer
from rnnserve.server.frontend.engine_client import EngineClient
from rnnserve.server.frontend.server import FrontendOptions, start_frontend
from rnnserve.server.frontend.tensors import from_array
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import engine_over_pipe


@asynccontextmanager
async def _frontend_over_pipe(
    repository: Path, folder: Path
) -> AsyncIterator[tuple[EngineServer, EngineClient, pb_grpc.InferenceServiceStub]]:
    """An engine behind its pipe, a frontend on it serving a loopback port, and a stub."""
    async with engine_over_pipe(load_repository(repository), folder) as (_, server, client):
        options = FrontendOptions(host="127.0.0.1", port=0, max_message_bytes=0)
        frontend = await start_frontend(client, Metrics(), options)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
                yield server, client, pb_grpc.InferenceServiceStub(channel)
        finally:
            await frontend.stop(0)


def _step(session_id: str) -> pb.StepRequest:
    return pb.StepRequest(
        session_id=session_id, inputs={"x": from_array(np.zeros((1, 4), np.float32))}
    )


async def _streams_registered(server: EngineServer, client: EngineClient) -> tuple[int, int]:
    """Streams whose sessions the frontend and the engine still hold for release. A call
    over the pipe first: the engine has handled everything the frontend sent before it."""
    await client.repository_index()
    in_engine = sum(len(streams) for streams in server._releases.values())  # noqa: SLF001
    return len(client._releasing), in_engine  # noqa: SLF001


async def test_a_releasing_stream_whose_sessions_were_never_found_leaves_nothing_behind(
    test_repository: Path, tmp_path: Path
) -> None:
    """Streams that ask to release their sessions but step only ids that do not exist (a
    typo, a session that expired meanwhile) end like any other: nothing of them is kept."""
    async with _frontend_over_pipe(test_repository, tmp_path) as (server, client, stub):
        for n in range(3):
            message = pb.StreamStepsRequest(steps=[_step(f"gone-{n}")], close_sessions_on_end=True)
            results = [r async for m in stub.StreamSteps(iter([message])) for r in m.results]
            assert [r.error.code for r in results] == [grpc.StatusCode.NOT_FOUND.value[0]]
        assert await _streams_registered(server, client) == (0, 0)


async def test_a_releasing_stream_whose_session_ended_meanwhile_leaves_nothing_behind(
    test_repository: Path, tmp_path: Path
) -> None:
    """A stream that stepped a session, asked to release it, and found it closed by another
    call before its next step leaves nothing registered once it ends."""
    async with _frontend_over_pipe(test_repository, tmp_path) as (server, client, stub):
        opened = await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
        sid = opened.session.session_id
        call = stub.StreamSteps()
        await call.write(pb.StreamStepsRequest(steps=[_step(sid)], close_sessions_on_end=True))
        assert (await call.read()).results[0].response.position == 1
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
        await call.write(pb.StreamStepsRequest(steps=[_step(sid)]))
        (result,) = (await call.read()).results
        assert result.error.code == grpc.StatusCode.NOT_FOUND.value[0]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        assert await _streams_registered(server, client) == (0, 0)
