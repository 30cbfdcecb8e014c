"""The exceptions the SDK raises; callers never see a gRPC type.

Every failed call becomes one of these, chosen by its gRPC status code and, where the code
alone is ambiguous, by the machine-readable reason the server sends (a ``google.rpc.ErrorInfo``
in ``grpc-status-details-bin``, repeated in the trailer ``rnnserve-error-reason``)::

    RnnserveError
    ├── InvalidInput                INVALID_ARGUMENT, OUT_OF_RANGE
    ├── NotFound                    NOT_FOUND
    │   ├── ModelNotFound           MODEL_NOT_FOUND, VERSION_NOT_FOUND
    │   └── SessionNotFound         SESSION_NOT_FOUND
    │       ├── SessionExpired      SESSION_EXPIRED
    │       ├── SessionEvicted      SESSION_EVICTED
    │       └── SessionClosed       SESSION_CLOSED
    ├── AlreadyExists               ALREADY_EXISTS
    ├── CapacityExceeded            RESOURCE_EXHAUSTED
    ├── FailedPrecondition          FAILED_PRECONDITION (STATE_INCOMPATIBLE, VERSION_NOT_READY, ...)
    │   ├── PositionMismatch        POSITION_MISMATCH
    │   └── VersionRetiring         VERSION_RETIRING
    ├── Unavailable                 UNAVAILABLE (retried for safe calls)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED (retried for safe calls)
    ├── Unauthenticated             UNAUTHENTICATED
    ├── PermissionDenied            PERMISSION_DENIED
    └── ServerError                 anything else (INTERNAL, UNKNOWN, UNIMPLEMENTED, ...)

Catch ``SessionNotFound`` to mean "this session is gone, open a new one"; its subclasses say
why. Each exception carries ``.code`` (a ``grpc.StatusCode``), ``.metadata`` (the server's
``ErrorInfo.metadata``, e.g. ``PositionMismatch.position``), ``.reason`` (the server's
reason string, empty when none was sent), ``.message`` and ``.retry_after``: the seconds the
server asked the client to wait before trying again (a ``google.rpc.RetryInfo``'s
``retry_delay``), or None when it sent none. The server sends one with UNAVAILABLE
``DRAINING``, ``SESSION_MOVING`` and ``STATE_STORE_UNAVAILABLE`` (the SDK's own retries wait
at least that long) and with RESOURCE_EXHAUSTED ``QUOTA_EXCEEDED`` for a unary step past its
identity's step or byte budget (not retried: the caller decides; the open-session quota
sends none). A step that fails alone on a ``StreamSteps`` call carries the same delay in its
``StepError.retry_delay`` (streamed steps are not retried by the SDK: the caller decides).

The status details are read with grpcio-status (``rpc_status.from_call``) where it is
installed, else straight from ``grpc-status-details-bin`` when ``google.rpc`` is importable;
without either, only the ``rnnserve-error-reason`` trailer is read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from rnnserve.v1 import error_reason_pb2

REASON_TRAILER = "rnnserve-error-reason"
_STATUS_DETAILS_TRAILER = "grpc-status-details-bin"
_ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


class RnnserveError(Exception):
    """Base of every error the SDK raises."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.reason = reason
        #: ``ErrorInfo.metadata``: what the server says a client needs to recover, e.g.
        #: ``{"position": "7", ...}`` for a POSITION_MISMATCH.
        self.metadata: dict[str, str] = dict(metadata or {})
        #: Seconds the server asked to wait before a retry (``RetryInfo.retry_delay``), or
        #: None when it sent no RetryInfo.
        self.retry_after: float | None = retry_after

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


class InvalidInput(RnnserveError):
    """The request was malformed: wrong shape, dtype, name, or a value out of range."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RnnserveError):
    """Something the call named does not exist."""

    default_code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(NotFound):
    """No such model, or no such version of it."""


class SessionNotFound(NotFound):
    """The session does not exist (any more): open a new one."""


class SessionExpired(SessionNotFound):
    """The session was idle longer than its model's idle timeout."""


class SessionEvicted(SessionNotFound):
    """The session was evicted to make room for a newer one."""


class SessionClosed(SessionNotFound):
    """The session was closed."""


class AlreadyExists(RnnserveError):
    """A session with the chosen id already exists."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class CapacityExceeded(RnnserveError):
    """The server is at a limit (sessions, queue, quota); try later or elsewhere."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(RnnserveError):
    """The call does not fit the present state of its session or model version (a state of
    another shape than the version's, a version not ready or released); the reason says which.
    Its subclasses are the cases a client recovers from on its own."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class PositionMismatch(FailedPrecondition):
    """A step's expected position was neither the current one nor a safe retry of the last."""

    @property
    def position(self) -> int | None:
        """The session's position on the server, when the server said (it does)."""
        value = self.metadata.get("position")
        return int(value) if value is not None else None

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class VersionRetiring(FailedPrecondition):
    """The model version is retiring: it takes no new sessions. Open one without a version
    (the newest ready one) or name another; sessions already on it go on."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(RnnserveError):
    """The server could not be reached, or is draining."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RnnserveError):
    """The call ran past its deadline."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(RnnserveError):
    """No valid credentials were presented."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RnnserveError):
    """The caller may not use this model or session."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ServerError(RnnserveError):
    """The server failed in a way the caller cannot fix (INTERNAL, UNKNOWN, ...)."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[RnnserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInput,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityExceeded,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}
_R = error_reason_pb2.ErrorReason.Name  # the API's one registry of reasons
_NOT_FOUND_BY_REASON: dict[str, type[NotFound]] = {
    _R(error_reason_pb2.MODEL_NOT_FOUND): ModelNotFound,
    _R(error_reason_pb2.VERSION_NOT_FOUND): ModelNotFound,
    _R(error_reason_pb2.SESSION_NOT_FOUND): SessionNotFound,
    _R(error_reason_pb2.SESSION_EXPIRED): SessionExpired,
    _R(error_reason_pb2.SESSION_EVICTED): SessionEvicted,
    _R(error_reason_pb2.SESSION_CLOSED): SessionClosed,
}
_PRECONDITION_BY_REASON: dict[str, type[FailedPrecondition]] = {
    _R(error_reason_pb2.POSITION_MISMATCH): PositionMismatch,
    "": PositionMismatch,  # a server (or proxy) that sends no reason: the usual case
    _R(error_reason_pb2.VERSION_RETIRING): VersionRetiring,
}
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def error_from_status(
    code: grpc.StatusCode | int,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> RnnserveError:
    """The exception for a status code (a ``grpc.StatusCode`` or its number) and reason."""
    if isinstance(code, int):
        code = _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    kind: type[RnnserveError] = _BY_CODE.get(code, ServerError)
    if code is grpc.StatusCode.NOT_FOUND:
        kind = _NOT_FOUND_BY_REASON.get(reason, NotFound)
    elif code is grpc.StatusCode.FAILED_PRECONDITION:
        kind = _PRECONDITION_BY_REASON.get(reason, FailedPrecondition)
    return kind(message, code=code, reason=reason, metadata=metadata, retry_after=retry_after)


def error_from_rpc(error: grpc.RpcError) -> RnnserveError:
    """The exception for a failed gRPC call (sync ``grpc.RpcError`` or ``AioRpcError``)."""
    code: Any = getattr(error, "code", lambda: grpc.StatusCode.UNKNOWN)()
    message: Any = getattr(error, "details", lambda: "")() or ""
    trailers: Any = getattr(error, "trailing_metadata", lambda: ())() or ()
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    reason, metadata, retry_after = _details(error, trailers)
    return error_from_status(code, str(message), reason, metadata, retry_after)


@contextlib.contextmanager
def mapped_errors() -> Iterator[None]:
    """Re-raise any gRPC error inside the block as the matching ``RnnserveError``."""
    try:
        yield
    except grpc.RpcError as error:
        raise error_from_rpc(error) from error


def _details(
    error: grpc.RpcError, trailers: Sequence[tuple[str, str | bytes]]
) -> tuple[str, dict[str, str], float | None]:
    """The server's reason, ErrorInfo metadata and RetryInfo delay: from the status details
    where they can be read, else the reason trailer alone."""
    reason = ""
    for key, value in trailers:
        if key == REASON_TRAILER:
            reason = value.decode() if isinstance(value, bytes) else value
            break
    status = _rich_status(error, trailers)
    if status is None:
        return reason, {}, None
    found, metadata, retry_after = _unpack(status)
    return found or reason, metadata, retry_after


def _rich_status(error: grpc.RpcError, trailers: Sequence[tuple[str, str | bytes]]) -> Any:
    """The call's ``google.rpc.Status`` (from ``grpc-status-details-bin``), or None: none was
    sent, it is malformed or names another code than the call's, or google.rpc is missing.
    A details blob that cannot be read never hides the status code itself."""
    try:
        from grpc_status import rpc_status
    except ImportError:
        rpc_status = None
    if rpc_status is not None:
        try:
            return rpc_status.from_call(error)  # checks code and message against the call's
        except Exception:
            return None
    try:
        from google.rpc import status_pb2
    except ImportError:
        return None
    for key, value in trailers:
        if key == _STATUS_DETAILS_TRAILER and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except Exception:
                return None
            code = getattr(error, "code", lambda: None)()
            if isinstance(code, grpc.StatusCode) and status.code != code.value[0]:
                return None
            return status
    return None


def _unpack(status: Any) -> tuple[str, dict[str, str], float | None]:
    """ErrorInfo's reason and metadata and RetryInfo's delay (seconds) in a google.rpc.Status."""
    from google.rpc import error_details_pb2

    reason, metadata, retry_after = "", {}, None
    for detail in status.details:
        if detail.type_url == _ERROR_INFO_TYPE and not reason:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = str(info.reason), dict(info.metadata)
        elif detail.type_url == _RETRY_INFO_TYPE and retry_after is None:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                delay = retry.retry_delay
                retry_after = max(0.0, delay.seconds + delay.nanos / 1e9)
    return reason, metadata, retry_after
