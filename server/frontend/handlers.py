"""Wrapping a gRPC method handler so cross-cutting code runs around every call.

Interceptors in ``grpc.aio`` see only the method name and metadata; to reach the call's
context (peer certificate, abort) and to run code around the whole call (counting it in
flight), the handler itself is wrapped. One helper does it for all four call shapes.

A call turned away here, before the method's own code runs (its message unreadable, too
large or late; the drain gate or authentication refusing it), is told to ``refused`` with the
status it got, so it is counted as the calls the methods answer are.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from .. import errors
from ..errors import RnnserveError
from .status import abort
from .wire import serialize

Around = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]
#: Told of a call refused before its method's code ran: the method's full name
#: (``/package.Service/Method``) and the status code the call got.
Refused = Callable[[str, grpc.StatusCode], None]
#: :data:`Refused` bound to one method.
RefusedCall = Callable[[grpc.StatusCode], None]

# Health and reflection must answer even while draining or without credentials.
EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


def wrap_handler(
    handler: grpc.RpcMethodHandler, around: Around, refused: RefusedCall | None = None
) -> grpc.RpcMethodHandler:
    """The same handler, with every call run inside ``around(context)``; a call that
    ``around`` turns away (it aborts before the handler runs) is told to ``refused``."""
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Admitted(around(context), context, refused):
                return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Admitted(around(context), context, refused):
                async for item in _each(inner_us(request, context)):
                    yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Admitted(around(context), context, refused):
                return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Admitted(around(context), context, refused):
            async for item in _each(inner_ss(requests, context)):
                yield item

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


class _Admitted:
    """``around``'s context for one call, telling ``refused`` of a call it turns away: one
    whose entry raised (the code it aborted with; a call that ended otherwise, its client
    gone, got no status from rnnserve and is not told)."""

    __slots__ = ("_around", "_context", "_refused")

    def __init__(
        self,
        around: AbstractAsyncContextManager[None],
        context: grpc.aio.ServicerContext,
        refused: RefusedCall | None,
    ) -> None:
        self._around, self._context, self._refused = around, context, refused

    async def __aenter__(self) -> None:
        try:
            await self._around.__aenter__()
        except BaseException:
            code = self._context.code()
            if self._refused is not None and isinstance(code, grpc.StatusCode):
                self._refused(code)
            raise

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._around.__aexit__(*exc_info)


async def _each(result: Any) -> AsyncIterator[Any]:
    """Items of a streaming handler, whether it yields them or writes them to the context."""
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def read_body_within(
    handler: grpc.RpcMethodHandler, timeout_s: float, refused: RefusedCall | None = None
) -> grpc.RpcMethodHandler:
    """A unary-request handler registered as a streaming one, reading its one message itself.

    grpc reads a unary call's message before any handler code runs, with no time limit, so
    a caller that sends headers and half a body holds the call (and its buffers) forever.
    Reading the message here bounds that: a body that has not arrived within ``timeout_s``
    ends the call with DEADLINE_EXCEEDED, and bytes that are not the message end it with
    INVALID_ARGUMENT. On the wire a unary call and a one-message stream are the same.
    Every call ended here is told to ``refused``, with its status.
    """

    async def first(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async with asyncio.timeout(timeout_s):
                message = await context.read()
        except TimeoutError:
            await _refuse(context, errors.request_timeout(timeout_s), refused)
        except DecodeError as exc:
            await _refuse(
                context, errors.invalid_request(f"malformed request message: {exc}"), refused
            )
        if message is grpc.aio.EOF:
            await _no_message(context, refused)
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


async def _refuse(
    context: grpc.aio.ServicerContext, err: RnnserveError, refused: RefusedCall | None
) -> NoReturn:
    if refused is not None:
        refused(err.code)
    await abort(context, err)


async def _no_message(context: grpc.aio.ServicerContext, refused: RefusedCall | None) -> NoReturn:
    """End a call whose message never came: INVALID_ARGUMENT when the client sent none.

    gRPC hands the handler the same end when it refused the message itself, one over the
    receive limit: the call is over already (RESOURCE_EXHAUSTED, said by gRPC), so the
    status sent here cannot go out. That is how the two are told apart for ``refused``; a
    call its client cancelled before the message arrived whole looks the same, and one past
    its deadline is DEADLINE_EXCEEDED.
    """
    code = grpc.StatusCode.INVALID_ARGUMENT
    try:
        await abort(context, errors.invalid_request("the call sent no request message"))
    except grpc.aio.AbortError:
        raise  # sent: the client hears INVALID_ARGUMENT
    except BaseException:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        raise
    finally:
        if refused is not None:
            refused(code)


def service_handlers(
    servicer: object,
    service: ServiceDescriptor,
    around: Around | None,
    body_timeout_s: float | None = None,
    refused: Refused | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """Every method of ``service`` on ``servicer``, each wrapped once in ``around``.

    This is what the generated ``add_*Servicer_to_server`` builds, with the wrapping done at
    start instead of by an interceptor on every call: grpc.aio awaits each interceptor's
    ``intercept_service`` per call, which measured as a large share of a unary call's cost.
    With ``body_timeout_s``, unary-request methods read their message themselves, within
    that many seconds (:func:`read_body_within`). Calls refused by either are told to
    ``refused``.
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
        told = None if refused is None else functools.partial(refused, method_path(method))
        if around is not None:
            handler = wrap_handler(handler, around, told)
        if body_timeout_s is not None:
            handler = read_body_within(handler, body_timeout_s, told)
        handlers[method.name] = handler
    return handlers


def method_path(method: MethodDescriptor) -> str:
    """A method's full name as gRPC calls it: ``/package.Service/Method``."""
    return f"/{method.containing_service.full_name}/{method.name}"


def add_service(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    around: Around | None,
    body_timeout_s: float | None = None,
    refused: Refused | None = None,
) -> None:
    """Register ``servicer`` for ``service`` on ``server`` with every call run in ``around``
    (and, with ``body_timeout_s``, every unary request read within that many seconds); calls
    refused before the servicer's code runs are told to ``refused``."""
    handlers = service_handlers(servicer, service, around, body_timeout_s, refused)
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
