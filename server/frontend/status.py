"""The one place where an error becomes a gRPC status: for handlers, drain and auth alike.

A :class:`~rnnserve.server.errors.RnnserveError` becomes its status code and message with a
``google.rpc.Status`` in ``grpc-status-details-bin``: an ``ErrorInfo`` (domain "rnnserve",
the reason, and metadata such as the session's position), a ``BadRequest`` naming the field
for INVALID_ARGUMENT, a ``RetryInfo`` when the client should come back; and the reason again
in the ``rnnserve-error-reason`` trailer for clients without google.rpc types. Anything else
is a bug: logged here, answered INTERNAL with a fixed message (no traceback leaks).
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from rnnserve.v1 import inference_service_pb2 as pb

from .. import errors
from ..errors import RnnserveError

logger = logging.getLogger(__name__)

Trailers = tuple[tuple[str, str | bytes], ...]


def as_expected_error(exc: BaseException) -> RnnserveError:
    """Expected errors pass through; anything else is logged and becomes INTERNAL."""
    if isinstance(exc, RnnserveError):
        return exc
    logger.error("event=internal_error", exc_info=exc)
    return errors.internal()


def status_trailers(err: RnnserveError) -> Trailers:
    """Trailing metadata for an error: google.rpc.Status details and the reason key."""
    details = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=err.reason, domain=errors.DOMAIN, metadata=err.metadata)
    )
    details.append(info)
    if err.field and err.code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=err.field, description=err.message
        )
        bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(bad)
    if err.retry_after_s is not None:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=_duration(err.retry_after_s)))
        details.append(retry)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=details)
    return (
        ("grpc-status-details-bin", status.SerializeToString()),
        (errors.REASON_TRAILER, err.reason),
    )


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status of ``exc`` (always raises)."""
    err = as_expected_error(exc)
    await context.abort(err.code, err.message, status_trailers(err))
    raise AssertionError("unreachable")  # abort raises


def step_error(err: RnnserveError) -> pb.StepError:
    """A per-step error on a stream (the stream goes on), with the same retry delay a call's
    status would carry."""
    error = pb.StepError(
        code=err.code.value[0], message=err.message, reason=err.reason, metadata=err.metadata
    )
    if err.retry_after_s is not None:
        error.retry_delay.CopyFrom(_duration(err.retry_after_s))
    return error


def _duration(seconds: float) -> duration_pb2.Duration:
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
