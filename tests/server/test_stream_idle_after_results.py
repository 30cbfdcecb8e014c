"""A StreamSteps call is idle only once nothing of it has been outstanding for the idle
timeout (``--stream-idle-s``), however long its last message took to answer.

A client that sends a message and waits for its results before sending the next is not
idle while the engine works on them: a long chunk, a busy queue, or its results held back
until it reads them can take longer than the idle timeout. Once its last result is sent, it
has the whole idle timeout to send its next message, as after a quick one.

The engine and a frontend run in this process, the engine behind its pipe (as with
``--frontends 2``): the frontend's end of the pipe stops reading for a while, so the engine's
answer waits there, as an answer to a step that runs that long would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
from rnnserve.server.frontend.limits import ConnectionLimits
from rnnserve.server.frontend.server import FrontendOptions, start_frontend
from rnnserve.server.frontend.tensors import from_array
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import engine_over_pipe

IDLE_S = 4.0  # margins of seconds either way on a loaded machine


def _message(session_id: str) -> pb.StreamStepsRequest:
    x = from_array(np.zeros((1, 4), np.float32))
    return pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=session_id, inputs={"x": x})])


async def test_a_stream_whose_results_took_longer_than_the_idle_timeout_is_not_idle_after_them(
    test_repository: Path, tmp_path: Path
) -> None:
    repository = load_repository(test_repository)
    async with engine_over_pipe(repository, tmp_path) as (_, _, client):
        options = FrontendOptions(
            host="127.0.0.1",
            port=0,
            max_message_bytes=0,
            limits=ConnectionLimits(stream_idle_s=IDLE_S),
        )
        frontend = await start_frontend(client, Metrics(), options)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                opened = await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
                sid = opened.session.session_id
                call = stub.StreamSteps()
                pipe = client._pipe._transport  # noqa: SLF001 (hold the answer in the socket)
                assert pipe is not None
                pipe.pause_reading()
                await call.write(_message(sid))
                await asyncio.sleep(1.25 * IDLE_S)  # the step is outstanding past the timeout
                pipe.resume_reading()
                assert (await call.read()).results[0].response.position == 1
                # A pause well within the idle timeout, then the next message.
                await asyncio.sleep(0.65 * IDLE_S)
                if call.done():  # ended by the server meanwhile: say how
                    raise AssertionError(f"{await call.code()}: {await call.details()}")
                await call.write(_message(sid))
                assert (await call.read()).results[0].response.position == 2
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
        finally:
            await frontend.stop(0)
