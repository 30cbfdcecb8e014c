"""Error mapping, fed by real gRPC calls to a small in-process server that fails on purpose.

The server below aborts each call with the status code, ErrorInfo reason and trailer that the
request names, exactly as rnnserve's server reports errors; the SDK must turn each into the
right exception without the caller ever seeing a gRPC type.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from rnnserve.client import (
    AlreadyExists,
    AsyncClient,
    CapacityExceeded,
    ClientOptions,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    PositionMismatch,
    RnnserveError,
    ServerError,
    SessionClosed,
    SessionEvicted,
    SessionExpired,
    SessionNotFound,
    Unauthenticated,
    Unavailable,
    VersionRetiring,
)
from rnnserve.client._exceptions import error_from_rpc, error_from_status, mapped_errors

METHOD = "/test.Fail/Fail"


async def _fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    """Abort with {"code", "reason", "details": bool, "trailer": bool} from the request."""
    spec = json.loads(request)
    code = grpc.StatusCode[spec["code"]]
    trailers: list[tuple[str, str | bytes]] = []
    if spec["details"]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=spec["reason"], domain="rnnserve"))
        status = status_pb2.Status(code=code.value[0], message="failed on purpose", details=[info])
        trailers.append(("grpc-status-details-bin", status.SerializeToString()))
    if spec["trailer"]:
        trailers.append(("rnnserve-error-reason", spec["reason"]))
    context.set_trailing_metadata(tuple(trailers))
    await context.abort(code, "failed on purpose")
    raise AssertionError("abort returns never")


@pytest.fixture
async def failing_channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "test.Fail", {"Fail": grpc.unary_unary_rpc_method_handler(_fail)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop(None)


async def _fail_with(
    channel: grpc.aio.Channel, code: str, reason: str, *, details: bool, trailer: bool
) -> RnnserveError:
    call = channel.unary_unary(METHOD)
    request = json.dumps({"code": code, "reason": reason, "details": details, "trailer": trailer})
    with pytest.raises(RnnserveError) as caught:
        with mapped_errors():
            await call(request.encode())
    assert not isinstance(caught.value, grpc.RpcError)
    assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)
    return caught.value


CASES = [
    ("INVALID_ARGUMENT", "BAD_SHAPE", InvalidInput),
    ("OUT_OF_RANGE", "TOO_MANY_TIMESTEPS", InvalidInput),
    ("NOT_FOUND", "MODEL_NOT_FOUND", ModelNotFound),
    ("NOT_FOUND", "VERSION_NOT_FOUND", ModelNotFound),
    ("NOT_FOUND", "SESSION_NOT_FOUND", SessionNotFound),
    ("NOT_FOUND", "SESSION_EXPIRED", SessionExpired),
    ("NOT_FOUND", "SESSION_EVICTED", SessionEvicted),
    ("NOT_FOUND", "SESSION_CLOSED", SessionClosed),
    ("NOT_FOUND", "SOMETHING_NEW", NotFound),
    ("ALREADY_EXISTS", "SESSION_EXISTS", AlreadyExists),
    ("RESOURCE_EXHAUSTED", "SESSION_CAPACITY", CapacityExceeded),
    ("FAILED_PRECONDITION", "POSITION_MISMATCH", PositionMismatch),
    ("FAILED_PRECONDITION", "VERSION_RETIRING", VersionRetiring),
    ("FAILED_PRECONDITION", "STATE_INCOMPATIBLE", FailedPrecondition),
    ("FAILED_PRECONDITION", "VERSION_NOT_READY", FailedPrecondition),
    ("UNAVAILABLE", "DRAINING", Unavailable),
    ("DEADLINE_EXCEEDED", "", DeadlineExceeded),
    ("UNAUTHENTICATED", "TOKEN_INVALID", Unauthenticated),
    ("PERMISSION_DENIED", "NOT_SESSION_OWNER", PermissionDenied),
    ("INTERNAL", "", ServerError),
    ("UNIMPLEMENTED", "", ServerError),
]


@pytest.mark.parametrize("how", ["details+trailer", "details only", "trailer only"])
@pytest.mark.parametrize(("code", "reason", "expected"), CASES)
async def test_real_call_errors_map_to_the_exception_tree(
    failing_channel: grpc.aio.Channel,
    code: str,
    reason: str,
    expected: type[RnnserveError],
    how: str,
) -> None:
    error = await _fail_with(
        failing_channel, code, reason, details="details" in how, trailer="trailer" in how
    )
    assert type(error) is expected
    assert error.code is grpc.StatusCode[code]
    assert error.reason == reason
    assert error.message == "failed on purpose"


async def test_without_any_reason_not_found_is_the_base_class(
    failing_channel: grpc.aio.Channel,
) -> None:
    error = await _fail_with(failing_channel, "NOT_FOUND", "", details=False, trailer=False)
    assert type(error) is NotFound
    assert error.reason == ""


async def test_an_unreachable_server_is_unavailable() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(Unavailable):
            with mapped_errors():
                await channel.unary_unary(METHOD)(b"{}", timeout=10)


def test_sync_rpc_errors_are_mapped_too() -> None:
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(METHOD)(b"{}", timeout=10)
        error = error_from_rpc(caught.value)
        assert type(error) is ServerError
        assert error.code is grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)


def test_stream_step_errors_map_by_number() -> None:
    error = error_from_status(code_pb2.NOT_FOUND, "gone", "SESSION_CLOSED")
    assert type(error) is SessionClosed
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert isinstance(error, SessionNotFound)
    assert type(error_from_status(999, "?")) is ServerError
    mismatch = error_from_status(
        code_pb2.FAILED_PRECONDITION, "moved on", "POSITION_MISMATCH", {"position": "3"}
    )
    assert type(mismatch) is PositionMismatch and mismatch.position == 3


def test_a_retiring_version_is_its_own_error() -> None:
    from rnnserve.client import VersionRetiring

    error = error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "retiring", "VERSION_RETIRING")
    assert type(error) is VersionRetiring
    assert type(error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "?", "")).__name__ == (
        "PositionMismatch"
    )


def test_message_names_code_and_reason() -> None:
    error = error_from_status(grpc.StatusCode.NOT_FOUND, "session s1 expired", "SESSION_EXPIRED")
    assert str(error) == "NOT_FOUND SESSION_EXPIRED: session s1 expired"


def test_a_client_made_outside_any_loop_works_in_one_and_maps_errors() -> None:
    client = AsyncClient("127.0.0.1:1", options=ClientOptions(retries=1, backoff=0.0, timeout=10))

    async def call() -> None:
        try:
            with pytest.raises(Unavailable):
                await client.list_models()
        finally:
            await client.close()

    asyncio.run(call())
