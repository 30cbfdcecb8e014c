"""Wrapping a gRPC method handler so cross-cutting code runs around every call.

Interceptors in ``grpc.aio`` see only the method name and metadata; to reach the call's
context (peer certificate, abort) and to run code around the whole call (counting it in
flight), the handler itself is wrapped. One helper does it for all four call shapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]

# Health and reflection must answer even while draining or without credentials.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


class AroundInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call (health and reflection excepted) inside ``around(context)``."""

    def __init__(self, around: Around) -> None:
        self._around = around

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        return wrap_handler(handler, self._around)


def wrap_handler(handler: grpc.RpcMethodHandler, around: Around) -> grpc.RpcMethodHandler:
    """The same handler, with every call run inside ``around(context)``."""
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                async for item in _each(inner_us(request, context)):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(context):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async with around(context):
            async for item in _each(inner_ss(requests, context)):
                yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


async def _each(result: Any) -> AsyncIterator[Any]:
    """Items of a streaming handler, whether it yields them or writes them to the context."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result
