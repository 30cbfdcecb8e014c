"""Every call that names a session carries ``x-rnnserve-session-id`` (for proxy affinity).

Client interceptors record the metadata of each real call made to a real server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from rnnserve.client import AsyncClient, ClientOptions

from .reference import inputs_for

SESSION_HEADER = "x-rnnserve-session-id"


def _record(calls: list[tuple[str, dict[str, str]]], details: Any) -> None:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    calls.append((method.rsplit("/", 1)[-1], dict(details.metadata or ())))


class RecordUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, calls: list[tuple[str, dict[str, str]]]) -> None:
        self.calls = calls

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        _record(self.calls, details)
        return await continuation(details, request)


class RecordStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, calls: list[tuple[str, dict[str, str]]]) -> None:
        self.calls = calls

    async def intercept_stream_stream(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, requests: Any
    ) -> Any:
        _record(self.calls, details)
        return await continuation(details, requests)


async def test_session_calls_carry_the_session_header(target: str) -> None:
    calls: list[tuple[str, dict[str, str]]] = []
    options = ClientOptions(
        interceptors=(RecordUnary(calls), RecordStream(calls)), metadata=(("X-Tenant", "t1"),)
    )
    async with AsyncClient(target, options=options) as client:
        session = await client.open_session("tiny_rnn", session_id="sdk-header-check")
        x = inputs_for(session.model, 1, seed=70)
        await session.step(x)
        _ = [y async for y in session.steps([x, x])]
        await session.refresh()
        await session.export_state()
        child = await session.fork("sdk-header-child")
        await child.close()
        await session.reset()
        await session.close()

    named = {
        "OpenSession": "sdk-header-check",
        "Step": "sdk-header-check",
        "StreamSteps": "sdk-header-check",
        "GetSession": "sdk-header-check",
        "ExportState": "sdk-header-check",
        "ForkSession": "sdk-header-check",
        "ResetSession": "sdk-header-check",
    }
    seen = {method for method, _ in calls}
    assert set(named) | {"CloseSession", "GetModel"} <= seen
    for method, metadata in calls:
        assert metadata.get("x-tenant") == "t1"
        if method in named:
            assert metadata.get(SESSION_HEADER) == named[method], method
        if method == "CloseSession":
            assert metadata.get(SESSION_HEADER) in {"sdk-header-check", "sdk-header-child"}
        if method == "GetModel":
            assert SESSION_HEADER not in metadata
