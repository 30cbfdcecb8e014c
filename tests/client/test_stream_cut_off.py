"""A step stream whose call is cut off (its client closed) while its writer waits on the call.

The real server reads every message at once and answers before a write could wait, so the
stream's far end here is staged: a TCP listener that never answers (the call never starts:
the writer waits for it to), or a gRPC peer whose StreamSteps never reads (flow control holds
a large write). The steps' model and session come from the real server.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import AsyncClient, AsyncSession, Unavailable
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc


class NeverReads(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """StreamSteps that takes the call and never reads a message of it."""

    async def StreamSteps(self, request_iterator: Any, context: Any) -> None:  # noqa: N802
        await asyncio.Event().wait()


@pytest.fixture
async def never_reads() -> AsyncIterator[str]:
    """The address of a gRPC peer whose StreamSteps never reads."""
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(NeverReads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture
async def session(target: str) -> AsyncIterator[AsyncSession]:
    """A session of the real server (its handle carries the model the steps are encoded for)."""
    async with AsyncClient(target) as client, await client.open_session("tiny_lstm") as opened:
        yield opened


async def test_a_stream_cut_off_before_its_call_started_closes(session: AsyncSession) -> None:
    # The writer waited for the call to start, which a cancelled call never does: close()
    # waited on the writer forever.
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = AsyncClient(f"127.0.0.1:{silent.getsockname()[1]}")
        stream = client.stream()
        stream.start()
        step = stream.submit(session, np.zeros((1, 4), np.float32))
        await asyncio.sleep(0.2)  # the writer waits for the call to start
        await client.close()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(step, 10)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(stream.close(), 10)


async def test_a_stream_cut_off_mid_write_closes_with_unavailable(
    session: AsyncSession, never_reads: str
) -> None:
    # The write interrupted by the cancelled call raised CancelledError in the writer, and
    # close() passed it on: the caller's task looked cancelled.
    client = AsyncClient(never_reads)
    stream = client.stream()
    stream.start()
    x = np.zeros((16384, 4), np.float32)  # 256 KiB a step: the peer's window fills at once
    steps = [stream.submit(session, x) for _ in range(32)]
    await asyncio.sleep(0.5)  # the writer waits for room to write
    await client.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*steps, return_exceptions=True), 10)
    assert all(isinstance(outcome, Unavailable) for outcome in outcomes), outcomes
    with pytest.raises(Unavailable):
        await asyncio.wait_for(stream.close(), 10)
