"""Wrapping a gRPC method handler so cross-cutting code runs around every call.

Interceptors in ``grpc.aio`` see only the method name and metadata; to reach the call's
context (peer certificate, abort) and to run code around the whole call (counting it in
flight), the handler itself is wrapped. One helper does it for all four call shapes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from .. import errors
from .status import abort
from .wire import serialize

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]

# Health and reflection must answer even while draining or without credentials.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


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


def read_body_within(handler: grpc.RpcMethodHandler, timeout_s: float) -> grpc.RpcMethodHandler:
    """A unary-request handler registered as a streaming one, reading its one message itself.

    grpc reads a unary call's message before any handler code runs, with no time limit, so
    a caller that sends headers and half a body holds the call (and its buffers) forever.
    Reading the message here bounds that: a body that has not arrived within ``timeout_s``
    ends the call with DEADLINE_EXCEEDED, and bytes that are not the message end it with
    INVALID_ARGUMENT. On the wire a unary call and a one-message stream are the same.
    """

    async def first(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                message = await context.read()
        except TimeoutError:
            await abort(context, errors.request_timeout(timeout_s))
        except DecodeError as exc:
            await abort(context, errors.invalid_request(f"malformed request message: {exc}"))
        if message is grpc.aio.EOF:
            await abort(context, errors.invalid_request("the call sent no request message"))
        return message

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner_uu(await first(requests, context), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for item in _each(inner_us(await first(requests, context), context)):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, handler.request_deserializer, handler.response_serializer
        )
    return handler  # the caller streams its requests: the handler reads them as they come


def service_handlers(
    servicer: object,
    service: ServiceDescriptor,
    around: Around | None,
    body_timeout_s: float | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of ``service`` on ``servicer``, each wrapped once in ``around``.

    This is what the generated ``add_*Servicer_to_server`` builds, with the wrapping done at
    start instead of by an interceptor on every call: grpc.aio awaits each interceptor's
    ``intercept_service`` per call, which measured as a large share of a unary call's cost.
    With ``body_timeout_s``, unary-request methods read their message themselves, within
    that many seconds (:func:`read_body_within`).
    """
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        make = kinds[(method.client_streaming, method.server_streaming)]
        handler = make(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=serialize,  # bytes from .wire pass through
        )
        if around is not None:
            handler = wrap_handler(handler, around)
        if body_timeout_s is not None:
            handler = read_body_within(handler, body_timeout_s)
        handlers[method.name] = handler
    return handlers


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    around: Around | None,
    body_timeout_s: float | None = None,
) -> None:
    """Register ``servicer`` for ``service`` on ``server`` with every call run in ``around``
    (and, with ``body_timeout_s``, every unary request read within that many seconds)."""
    handlers = service_handlers(servicer, service, around, body_timeout_s)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def chain(*arounds: Around) -> Around:
    """One ``around`` running each of ``arounds`` inside the one before."""

    @contextlib.asynccontextmanager
    async def around(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for each in arounds:
                await stack.enter_async_context(each(context))
            yield

    return around
