"""A call whose reply is lost is retried, and its retry does what the first try did, once.

A client interceptor lets a call reach the real server (which applies it) and then reports
UNAVAILABLE to the SDK, as a dropped connection would. A step's retry carries the same
expected_position and inputs, so the server answers from its stored reply. Opens and forks
carry an id the SDK chose (or the caller's), so a retry that finds the session already there
takes it if it is the one the lost try made; a close's retry that finds the session closed
is done; a reset is repeated (it sets, it does not add).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import (
    AlreadyExists,
    AsyncClient,
    ClientOptions,
    PositionMismatch,
    SessionClosed,
    Unavailable,
)

from .reference import as_dict, assert_outputs_close, concat, inputs_for, reference


class LoseReplies(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """For one method: records each request, and fails the next ``lose`` calls UNAVAILABLE
    after the server answered (a lost reply) or the next ``drop`` calls before they are sent
    (the client cannot tell the two apart: neither carries a server's reason)."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.requests: list[Any] = []
        self.lose = 0
        self.drop = 0

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        if not (method.decode() if isinstance(method, bytes) else method).endswith(
            "/" + self.method
        ):
            return await continuation(client_call_details, request)
        self.requests.append(request)
        if self.drop > 0:
            self.drop -= 1
            raise _lost("connection reset before the request was sent")
        call = await continuation(client_call_details, request)
        if self.lose > 0:
            self.lose -= 1
            await call  # the server has applied it; its reply goes missing
            raise _lost("reply lost in transit")
        return call


def _lost(details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details
    )


def _losing(method: str) -> tuple[LoseReplies, ClientOptions]:
    lossy = LoseReplies(method)
    return lossy, ClientOptions(interceptors=(lossy,), retries=2, backoff=0.0)


async def test_a_retried_step_advances_the_position_once(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    lossy, options = _losing("Step")
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_lstm") as session:
            model = session.model
            x = inputs_for(model, 4, seed=60)
            first = as_dict(await session.step(x[:2]), model)
            lossy.lose = 1
            second = as_dict(await session.step(x[2:]), model)
            assert len(lossy.requests) == 3  # the lost one and its retry
            assert session.position == 4
            assert (await session.refresh()).position == 4
            expected = reference(sdk_testing, sdk_repository, model, x)
            assert_outputs_close(concat([first, second], model), expected)


async def test_retries_give_up_with_unavailable(target: str) -> None:
    lossy = LoseReplies("Step")
    options = ClientOptions(interceptors=(lossy,), retries=1, backoff=0.0)
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 1, seed=61)
            lossy.lose = 2
            with pytest.raises(Unavailable):
                await session.step(x)
            # Applied once on the server although both replies were lost.
            assert (await session.refresh()).position == 1


async def test_a_call_waiting_to_retry_when_the_client_closes_raises_unavailable() -> None:
    # The try after the wait used to go to the closed channel and raise grpc's UsageError.
    with socket.socket() as probe:  # a port nothing listens on: every try is UNAVAILABLE
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ClientOptions(retries=3, backoff=1.0, jitter=0.0)
    client = AsyncClient(f"127.0.0.1:{port}", options=options)
    call = asyncio.create_task(client.list_models())
    await asyncio.sleep(0.5)  # the first try was refused; the call waits 1 s to retry
    await client.close()
    with pytest.raises(Unavailable, match="closed"):
        await asyncio.wait_for(call, 10)


class HoldReplies(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Holds each reply of one method, once the server has answered, until ``release``."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        method = client_call_details.method
        if not (method.decode() if isinstance(method, bytes) else method).endswith(
            "/" + self.method
        ):
            return call
        response = await call
        self.answered.set()
        await self.release.wait()
        return response


@pytest.mark.parametrize("read", ["refresh", "export_state"])
async def test_a_read_answered_before_a_step_does_not_move_the_position_back(
    target: str, read: str
) -> None:
    # The read's reply (position 0), arriving after the step's (position 1), set the position
    # back to 0: the next step expected 0 and, its inputs the same as the last step's, was
    # answered from that step's stored reply and applied nothing.
    held = HoldReplies("GetSession" if read == "refresh" else "ExportState")
    async with AsyncClient(target, options=ClientOptions(interceptors=(held,))) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 1, seed=69)
            reading = asyncio.create_task(getattr(session, read)())
            await held.answered.wait()  # the server read position 0; its reply is delayed
            stepping = asyncio.create_task(session.step(x))
            await asyncio.sleep(0.3)
            held.release.set()
            await asyncio.gather(reading, stepping)
            assert session.position == 1
            await session.step(x)
            assert session.position == 2
            held.answered.clear()
            assert (await session.refresh()).position == 2


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


async def test_an_open_whose_reply_is_lost_opens_one_session(target: str) -> None:
    lossy, options = _losing("OpenSession")
    lossy.lose = 1
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_rnn") as session:
            ids = [request.session_id for request in lossy.requests]
            assert len(ids) == 2
            # The SDK chose the id, so the retry named the session the lost try opened.
            assert ids[0] and ids[0] == ids[1] == session.session_id
            assert session.position == 0
            await session.step(inputs_for(session.model, 1, seed=64))
            assert (await session.refresh()).position == 1


async def test_an_open_from_a_state_with_a_chosen_id_whose_reply_is_lost_continues_exactly(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    lossy, options = _losing("OpenSession")
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_gru") as original:
            model = original.model
            x = inputs_for(model, 5, seed=65)
            await original.step(x[:3])
            exported = await original.export_state()
        lossy.lose = 1
        async with await client.open_session(
            "tiny_gru", session_id="sdk-lost-open", initial_state=exported
        ) as moved:
            assert len(lossy.requests) == 3  # the first open, the lost one and its retry
            assert (moved.session_id, moved.position) == ("sdk-lost-open", 3)
            continued = as_dict(await moved.step(x[3:]), model)
    expected = reference(sdk_testing, sdk_repository, model, x)
    assert_outputs_close(continued, {k: v[3:] for k, v in expected.items()})


@pytest.mark.parametrize("taken_by", ["a stepped session", "another initial state"])
async def test_an_id_taken_before_is_already_exists_even_after_a_failed_try(
    target: str, taken_by: str
) -> None:
    """The retry's ALREADY_EXISTS is taken for the lost try's success only when the session
    is exactly what the open asked for and was never used since; here it is not."""
    session_id = "sdk-taken-" + taken_by.replace(" ", "-")
    async with AsyncClient(target) as client:
        model = await client.get_model("tiny_lstm")
        if taken_by == "a stepped session":
            existing = await client.open_session("tiny_lstm", session_id=session_id)
            await existing.step(inputs_for(model, 1, seed=66))
        else:
            ones = {state.name: np.ones(state.shape, state.dtype) for state in model.states}
            existing = await client.open_session(
                "tiny_lstm", session_id=session_id, initial_state=ones
            )
        lossy, options = _losing("OpenSession")
        lossy.drop = 1
        try:
            async with AsyncClient(target, options=options) as retrying:
                with pytest.raises(AlreadyExists):
                    await retrying.open_session("tiny_lstm", session_id=session_id)
            assert len(lossy.requests) == 2
        finally:
            await existing.close()


async def test_a_close_whose_reply_is_lost_is_closed(target: str) -> None:
    lossy, options = _losing("CloseSession")
    async with AsyncClient(target, options=options) as client:
        session = await client.open_session("tiny_rnn")
        lossy.lose = 1
        await session.close()
        assert session.closed
        assert len(lossy.requests) == 2
        with pytest.raises(SessionClosed):
            await client.session(session.session_id)


async def test_a_fork_whose_reply_is_lost_makes_one_fork(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    lossy, options = _losing("ForkSession")
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_lstm") as parent:
            model = parent.model
            x = inputs_for(model, 4, seed=67)
            await parent.step(x[:2])
            lossy.lose = 1
            async with await parent.fork() as child:
                ids = [request.new_session_id for request in lossy.requests]
                assert len(ids) == 2 and ids[0] and ids[0] == ids[1] == child.session_id
                assert child.position == 2
                continued = as_dict(await child.step(x[2:]), model)
    expected = reference(sdk_testing, sdk_repository, model, x)
    assert_outputs_close(continued, {k: v[2:] for k, v in expected.items()})


async def test_a_reset_whose_reply_is_lost_is_repeated(target: str) -> None:
    lossy, options = _losing("ResetSession")
    async with AsyncClient(target, options=options) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 2, seed=68)
            first = as_dict(await session.step(x), session.model)
            lossy.lose = 1
            await session.reset()
            assert len(lossy.requests) == 2
            assert session.position == 0
            assert_outputs_close(as_dict(await session.step(x), session.model), first)
