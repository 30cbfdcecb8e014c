"""A handle's position follows the order in which the server applied its steps, whatever
order their replies arrive in.

A client interceptor holds the replies of one StreamSteps call once the server has sent
them, so a step streamed on it is applied and answered late, after a later step of the same
session (on another stream, or unary) has been applied and answered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from rnnserve.client import AsyncClient, ClientOptions

from .reference import inputs_for


class HoldFirstStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Holds every reply of the first StreamSteps call until ``release``; later calls pass."""

    def __init__(self) -> None:
        self.calls = 0
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> AsyncIterator[Any]:
        self.calls += 1
        hold = self.calls == 1
        call = await continuation(client_call_details, request_iterator)

        async def replies() -> AsyncIterator[Any]:
            async for reply in call:
                if hold:
                    self.answered.set()
                    await self.release.wait()
                yield reply

        return replies()


@pytest.mark.parametrize("later", ["another stream", "unary"])
async def test_a_streamed_reply_arriving_late_does_not_move_the_position_back(
    target: str, later: str
) -> None:
    # The late reply (position 1) set the position back from 2 to 1: the next unary step
    # expected 1 and, its inputs the same as the last step's, was answered from that step's
    # stored reply and applied nothing.
    held = HoldFirstStream()
    async with AsyncClient(target, options=ClientOptions(interceptors=(held,))) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 1, seed=301)
            async with client.stream() as slow:
                first = slow.submit(session, x)
                await held.answered.wait()  # applied: 0 -> 1; its reply is held
                if later == "unary":
                    assert (await session.refresh()).position == 1
                    await session.step(x)
                else:
                    async with client.stream() as fast:
                        await fast.step(session, x)
                assert session.position == 2
                held.release.set()
                await first
                assert session.position == 2
            await session.step(x)
            assert session.position == 3
            assert (await session.refresh()).position == 3


async def test_a_streamed_reply_held_back_does_not_count_after_the_reset(target: str) -> None:
    # The reply of a step applied before the reset, arriving after it, set the position to 1
    # while the session was at 0: the next step expected 1 and was refused. (The reset now
    # waits for that reply, and counts it before setting the position back.)
    held = HoldFirstStream()
    async with AsyncClient(target, options=ClientOptions(interceptors=(held,))) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 1, seed=302)
            async with client.stream() as slow:
                first = slow.submit(session, x)
                await held.answered.wait()
                reset = asyncio.create_task(session.reset())
                held.release.set()
                await first
                await reset
                assert session.position == 0
            assert session.position == 0
            await session.step(x)
            assert session.position == 1
            assert (await session.refresh()).position == 1


async def test_refresh_sets_the_position_read_when_no_streamed_step_is_in_flight(
    target: str,
) -> None:
    # Positions only grow between resets through the handle; a refresh with nothing of the
    # handle in flight still takes the server's word (here: a reset through another handle).
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 2, seed=303)
            async with client.stream() as stream:
                await stream.step(session, x)
            assert session.position == 2
            other = await client.session(session.session_id)
            await other.reset()
            assert (await session.refresh()).position == 0
            assert session.position == 0
            await session.step(x)
            assert session.position == 2


async def test_a_reset_waits_for_the_steps_the_handle_streamed_before_it(target: str) -> None:
    # The reset went out at once, beside a step streamed just before it and still queued
    # behind other sessions' steps: the server applied the step after the reset (position 1)
    # while the handle, counting the step's reply as one of before the reset, said 0, and its
    # next unary step was a PositionMismatch.
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_rnn") as session:
            others = [await client.open_session("tiny_rnn") for _ in range(4)]
            x = inputs_for(session.model, 1, seed=304)
            async with client.stream(max_steps_per_message=1) as stream:
                for _ in range(5):
                    ahead = [stream.submit(other, x) for other in others for _ in range(50)]
                    streamed = stream.submit(session, x)
                    await session.reset()
                    assert streamed.done()  # answered before the reset was sent
                    await asyncio.gather(streamed, *ahead)
                    assert session.position == 0
                    await session.step(x)  # expects 0: refused if the server says 1
                    assert session.position == 1
            assert (await session.refresh()).position == 1
