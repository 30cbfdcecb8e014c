"""A step whose reply is lost is retried with expected_position and applied exactly once.

A client interceptor lets the first Step reach the real server (which applies it) and then
reports UNAVAILABLE to the SDK, as a dropped connection would. The SDK's retry carries the
same expected_position and inputs, so the server answers from its stored reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from rnnserve.client import AsyncClient, ClientOptions, PositionMismatch, Unavailable

from .reference import as_dict, assert_outputs_close, concat, inputs_for, reference


class LoseStepReplies(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Drops the reply of the next ``count`` Step calls after the server has answered them."""

    def __init__(self) -> None:
        self.to_lose = 0
        self.steps_sent = 0

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        method = client_call_details.method
        if (method.decode() if isinstance(method, bytes) else method).endswith("/Step"):
            self.steps_sent += 1
            if self.to_lose > 0:
                self.to_lose -= 1
                await call  # the server has applied the step; its reply goes missing
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="reply lost in transit",
                )
        return call


async def test_a_retried_step_advances_the_position_once(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    lossy = LoseStepReplies()
    options = ClientOptions(interceptors=(lossy,), retries=2, backoff=0.0)
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_lstm") as session:
            model = session.model
            x = inputs_for(model, 4, seed=60)
            first = as_dict(await session.step(x[:2]), model)
            lossy.to_lose = 1
            second = as_dict(await session.step(x[2:]), model)
            assert lossy.steps_sent == 3  # the lost one and its retry
            assert session.position == 4
            assert (await session.refresh()).position == 4
            expected = reference(sdk_testing, sdk_repository, model, x)
            assert_outputs_close(concat([first, second], model), expected)


async def test_retries_give_up_with_unavailable(target: str) -> None:
    lossy = LoseStepReplies()
    options = ClientOptions(interceptors=(lossy,), retries=1, backoff=0.0)
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 1, seed=61)
            lossy.to_lose = 2
            with pytest.raises(Unavailable):
                await session.step(x)
            # Applied once on the server although both replies were lost.
            assert (await session.refresh()).position == 1


async def test_a_stale_expected_position_is_a_position_mismatch(target: str) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_rnn") as session:
            other = await client.session(session.session_id)  # a second handle, same session
            x = inputs_for(session.model, 1, seed=62)
            await session.step(x)
            await session.step(x)
            with pytest.raises(PositionMismatch):
                await other.step(inputs_for(session.model, 1, seed=63))  # expects position 0
            assert (await session.refresh()).position == 2
