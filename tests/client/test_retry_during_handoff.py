"""The SDK against real servers sharing a real Redis: the UNAVAILABLE answers that carry a
RetryInfo (SESSION_MOVING while a draining replica hands a session off,
STATE_STORE_UNAVAILABLE while the store is down) show the server's delay on the exception,
and a retried call waits at least that long between tries and lands once the session does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from deploy.tools import free_port
from rnnserve.client import AsyncClient, ClientOptions, Unavailable
from rnnserve.client._tensors import to_tensor
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from scaleout.redis_server import RedisServer, redis_server_binary

from .reference import as_dict, assert_outputs_close, concat, inputs_for, reference

MODEL = "tiny_lstm"
#: The delay the server's RetryInfo asks for on these answers (server/engine/residency.py).
SERVER_DELAY_S = 0.2


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port (skips where none is installed)."""
    redis_server_binary()
    with RedisServer(tmp_path_factory.mktemp("redis"), free_port()) as server:
        yield server


class RecordSends(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """When each call of one method was sent."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.sent: list[float] = []

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.endswith("/" + self.method):
            self.sent.append(time.monotonic())
        return await continuation(details, request)

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.sent, self.sent[1:], strict=False)]


async def _until(what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s} s for {what}")
        await asyncio.sleep(0.01)


def _patient(steps: RecordSends) -> ClientOptions:
    """Many retries and no backoff of the SDK's own: any wait comes from the server."""
    return ClientOptions(retries=100, backoff=0.0, interceptors=(steps,))


async def test_a_step_during_a_handoff_waits_the_servers_delay_and_applies_once(
    test_repository: Path, redis_server: RedisServer, sdk_testing: Any
) -> None:
    """A session resident on a draining replica is marked moving before it is written to
    Redis; a step reaching the other replica in that window is answered UNAVAILABLE
    SESSION_MOVING with a RetryInfo. The SDK retries no sooner than asked, and the step
    applies once after the handoff."""
    prefix = "sdk-moving:"
    sid = "sdk-moving-1"
    args = ("--state-store", redis_server.url, "--state-store-prefix", prefix)
    steps = RecordSends("Step")
    with (
        ServerProcess(test_repository, *args) as leaving,
        ServerProcess(test_repository, *args) as staying,
    ):
        async with AsyncClient(staying.address, options=_patient(steps)) as client:
            session = await client.open_session(MODEL, session_id=sid)
            model = session.model
            x = inputs_for(model, 2, seed=80)
            first = as_dict(await session.step(x[:1]), model)
            async with AsyncClient(leaving.address) as other:
                await other.session(sid)  # called back: now resident on the leaving replica
            # The drain's window, held open: marked moving, not written yet.
            redis_server.client().set(f"{prefix}anonymous/{sid}#moving", b"1", px=30_000)
            async with AsyncClient(staying.address, options=ClientOptions(retries=0)) as once:
                with pytest.raises(Unavailable) as caught:
                    await once.session(sid)
            assert caught.value.reason == "SESSION_MOVING"
            assert caught.value.retry_after == pytest.approx(SERVER_DELAY_S)

            stepping = asyncio.create_task(session.step(x[1:]))
            await _until("the step's first try", lambda: len(steps.sent) >= 2)
            assert await asyncio.to_thread(leaving.stop) == 0  # the drain writes the session
            second = as_dict(await stepping, model)
            assert session.position == 2
            assert (await session.refresh()).position == 2

    tries = steps.gaps()[1:]  # the handoff step's tries (the first gap is the first step's)
    assert len(tries) >= 1, steps.sent
    assert all(gap >= SERVER_DELAY_S * 0.9 for gap in tries), tries
    expected = reference(sdk_testing, test_repository, model, x)
    assert_outputs_close(concat([first, second], model), expected)


async def test_a_parked_session_waits_out_a_redis_outage_at_the_servers_pace(
    test_repository: Path, tmp_path: Path, sdk_testing: Any
) -> None:
    """A session parked in a Redis that is down answers UNAVAILABLE STATE_STORE_UNAVAILABLE
    with a RetryInfo; the SDK retries at that pace and the step applies once Redis is back
    (same port, same saved data)."""
    prefix = "sdk-outage:"
    sid = "sdk-outage-1"
    store = RedisServer(tmp_path / "redis", free_port())
    store.start()
    try:
        args = ("--state-store", store.url, "--state-store-prefix", prefix, "--park-after-s", "0.3")
        steps = RecordSends("Step")
        with ServerProcess(test_repository, *args) as server:
            async with AsyncClient(server.address, options=_patient(steps)) as client:
                session = await client.open_session(MODEL, session_id=sid)
                model = session.model
                x = inputs_for(model, 2, seed=81)
                first = as_dict(await session.step(x[:1]), model)
                redis = store.client()
                parked = f"{prefix}anonymous/{sid}"
                await _until("the session to be parked", lambda: redis.exists(parked))
                redis.save()
                store.kill()
                async with AsyncClient(server.address, options=ClientOptions(retries=0)) as once:
                    with pytest.raises(Unavailable) as caught:
                        await once.session(sid)
                assert caught.value.reason == "STATE_STORE_UNAVAILABLE"
                assert caught.value.retry_after == pytest.approx(SERVER_DELAY_S)

                stepping = asyncio.create_task(session.step(x[1:]))
                await _until("the step's first try", lambda: len(steps.sent) >= 2)
                await asyncio.to_thread(store.start)
                second = as_dict(await stepping, model)
                assert session.position == 2
    finally:
        store.stop()

    tries = steps.gaps()[1:]
    assert len(tries) >= 1, steps.sent
    assert all(gap >= SERVER_DELAY_S * 0.9 for gap in tries), tries
    expected = reference(sdk_testing, test_repository, model, x)
    assert_outputs_close(concat([first, second], model), expected)


async def test_a_streamed_step_in_an_outage_carries_the_servers_delay(
    test_repository: Path, tmp_path: Path
) -> None:
    """A step of a parked session on a StreamSteps stream while Redis is down fails alone,
    UNAVAILABLE STATE_STORE_UNAVAILABLE, with the server's delay in its StepError's
    ``retry_delay`` (what a client in any language reads) and on the SDK's exception."""
    prefix = "sdk-stream-outage:"
    sid = "sdk-stream-outage-1"
    store = RedisServer(tmp_path / "redis", free_port())
    store.start()
    try:
        args = ("--state-store", store.url, "--state-store-prefix", prefix, "--park-after-s", "0.3")
        with ServerProcess(test_repository, *args) as server:
            async with AsyncClient(server.address) as client:
                session = await client.open_session(MODEL, session_id=sid)
                x = inputs_for(session.model, 2, seed=82)
                input_name = session.model.inputs[0].name
                await session.step(x[:1])
                redis = store.client()
                await _until(
                    "the session to be parked", lambda: redis.exists(f"{prefix}anonymous/{sid}")
                )
                store.kill()

                async with client.stream() as stream:
                    with pytest.raises(Unavailable) as caught:
                        await stream.step(session, x[1:])
                assert caught.value.reason == "STATE_STORE_UNAVAILABLE"
                assert caught.value.retry_after == pytest.approx(SERVER_DELAY_S)

            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                step = pb.StepRequest(session_id=sid, request_id="1")
                step.inputs[input_name].CopyFrom(to_tensor(x[1:]))
                call = stub.StreamSteps(iter([pb.StreamStepsRequest(steps=[step])]))
                results = [result async for reply in call for result in reply.results]
            assert len(results) == 1 and results[0].HasField("error")
            error = results[0].error
            assert error.reason == "STATE_STORE_UNAVAILABLE"
            delay = error.retry_delay.seconds + error.retry_delay.nanos / 1e9
            assert delay == pytest.approx(SERVER_DELAY_S)
    finally:
        store.stop()
