"""The one expected error type of the server, and the reasons it carries.

Engine and frontend code raise :class:`RnnserveError` with a gRPC status code and a
machine-readable reason; only the frontend boundary (:mod:`rnnserve.server.frontend.status`)
turns it into a gRPC status. Anything else that escapes is a bug: INTERNAL.

The reasons are the values of the API's ``rnnserve.v1.ErrorReason`` enum
(``proto/rnnserve/v1/error_reason.proto``), the one registry the server, the SDK and clients in
other languages share; the names below are that enum's, so a typo fails at import.
"""

from __future__ import annotations

import grpc
from rnnserve.v1 import error_reason_pb2

DOMAIN = "rnnserve"
REASON_TRAILER = "rnnserve-error-reason"

_REASONS = error_reason_pb2.ErrorReason


def _reason(name: str) -> str:
    """``name`` checked against the API's registry (raises at import if it is not there)."""
    _REASONS.Value(name)
    return name


MODEL_NOT_FOUND = _reason("MODEL_NOT_FOUND")
VERSION_NOT_FOUND = _reason("VERSION_NOT_FOUND")
SESSION_NOT_FOUND = _reason("SESSION_NOT_FOUND")
SESSION_EXPIRED = _reason("SESSION_EXPIRED")
SESSION_EVICTED = _reason("SESSION_EVICTED")
SESSION_CLOSED = _reason("SESSION_CLOSED")
SESSION_EXISTS = _reason("SESSION_EXISTS")
CAPACITY_REACHED = _reason("CAPACITY_REACHED")
QUEUE_FULL = _reason("QUEUE_FULL")
QUOTA_EXCEEDED = _reason("QUOTA_EXCEEDED")
INVALID_TENSOR = _reason("INVALID_TENSOR")
INVALID_REQUEST = _reason("INVALID_REQUEST")
POSITION_MISMATCH = _reason("POSITION_MISMATCH")
SESSION_CHANGED = _reason("SESSION_CHANGED")
SHUTTING_DOWN = _reason("SHUTTING_DOWN")
DRAINING = _reason("DRAINING")
SESSION_MOVING = _reason("SESSION_MOVING")
STATE_STORE_UNAVAILABLE = _reason("STATE_STORE_UNAVAILABLE")
UNAUTHENTICATED = _reason("UNAUTHENTICATED")
POSITION_LIMIT = _reason("POSITION_LIMIT")
INTERNAL = _reason("INTERNAL")
VERSION_RETIRING = _reason("VERSION_RETIRING")
ADMIN_REQUIRED = _reason("ADMIN_REQUIRED")
STATE_INCOMPATIBLE = _reason("STATE_INCOMPATIBLE")
SESSION_BUSY = _reason("SESSION_BUSY")
VERSION_NOT_READY = _reason("VERSION_NOT_READY")

#: The largest position a session may reach (2**62): far beyond any real stream, and well
#: inside int64 so that position + timesteps never overflows while a step is checked.
MAX_POSITION = 1 << 62


class RnnserveError(Exception):
    """An expected failure of a request: its status code, reason and a message for people.

    ``field`` names the offending request field (e.g. ``inputs["x"].shape``) when there is
    one; the boundary reports it as a ``BadRequest`` field violation. ``metadata`` goes into
    ``ErrorInfo.metadata``: what a client needs to recover (e.g. the session's position).
    ``retry_after_s`` adds a ``RetryInfo``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = metadata or {}
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"RnnserveError({self.code.name}, {self.reason}, {self.message!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses the engine <-> frontend pipe by pickle.
        return (
            RnnserveError,
            (
                self.code,
                self.reason,
                self.message,
                self.field,
                self.metadata,
                self.retry_after_s,
            ),
        )


def invalid(message: str, field: str | None = None) -> RnnserveError:
    """INVALID_ARGUMENT about a tensor."""
    return RnnserveError(grpc.StatusCode.INVALID_ARGUMENT, INVALID_TENSOR, message, field)


def invalid_request(message: str, field: str | None = None) -> RnnserveError:
    """INVALID_ARGUMENT about a request field that is not a tensor (an id, a position)."""
    return RnnserveError(grpc.StatusCode.INVALID_ARGUMENT, INVALID_REQUEST, message, field)


def steps_quota(limit: int) -> RnnserveError:
    """A unary step of an identity that already has ``limit`` steps unanswered."""
    return RnnserveError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        QUOTA_EXCEEDED,
        f"this identity has {limit} steps queued and unanswered; retry once some are answered",
        retry_after_s=0.1,
    )


def bytes_quota(used: int, size: int, limit: int) -> RnnserveError:
    """A unary step of ``size`` bytes of an identity whose unanswered steps hold ``used``
    bytes, which together pass its byte bound ``limit``."""
    return RnnserveError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        QUOTA_EXCEEDED,
        f"this identity has {used} bytes of steps queued and unanswered; this step's {size} "
        f"more would pass its bound of {limit} bytes (--bytes-per-identity); retry once "
        "some are answered",
        retry_after_s=0.1,
    )


def request_timeout(timeout_s: float) -> RnnserveError:
    """A call whose request message did not arrive in time (sent half, then stalled)."""
    return RnnserveError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        INVALID_REQUEST,
        f"the request message did not arrive within {timeout_s:g} s; the call was ended",
    )


def stream_idle(idle_s: float, releasing: bool = False) -> RnnserveError:
    """A StreamSteps call that sent nothing, with nothing of it outstanding, for too long
    (``releasing``: it asked that its sessions be closed when it ends)."""
    kept = "its sessions are closed, as it asked" if releasing else "sessions are kept"
    return RnnserveError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        INVALID_REQUEST,
        f"the stream sent no message for {idle_s:g} s with no step outstanding and no results "
        f"to send; it was ended as idle (open a new stream to go on: {kept})",
    )


def ended_meanwhile(session_id: str, reason: str, what: str) -> RnnserveError:
    """NOT_FOUND for a session that ended (``reason``: closed, expired, evicted) while
    ``what`` (a step, a fork) waited for its turn."""
    return RnnserveError(
        grpc.StatusCode.NOT_FOUND,
        reason,
        f"session {session_id!r} ended while {what} waited",
        metadata={"session_id": session_id},
    )


def unavailable(reason: str, message: str, retry_after_s: float | None = None) -> RnnserveError:
    return RnnserveError(grpc.StatusCode.UNAVAILABLE, reason, message, retry_after_s=retry_after_s)


def internal() -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.INTERNAL, INTERNAL, "internal server error; the server log has the details"
    )


class ConfigError(Exception):
    """A model repository that cannot be served; the message names the file and field."""
