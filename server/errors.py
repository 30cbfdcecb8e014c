"""The one expected error type of the server, and the reasons it carries.

Domain code raises :class:`RnnserveError` with a gRPC status code and a machine-readable
reason; only the service boundary turns it into a gRPC status (with ``ErrorInfo`` details
and the ``rnnserve-error-reason`` trailer). Anything else that escapes is a bug: INTERNAL.
"""

from __future__ import annotations

import grpc

DOMAIN = "rnnserve"
REASON_TRAILER = "rnnserve-error-reason"

# Reasons (ErrorInfo.reason); clients match on these strings.
MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
SESSION_EXPIRED = "SESSION_EXPIRED"
SESSION_EVICTED = "SESSION_EVICTED"
SESSION_CLOSED = "SESSION_CLOSED"
SESSION_EXISTS = "SESSION_EXISTS"
CAPACITY_REACHED = "CAPACITY_REACHED"
QUEUE_FULL = "QUEUE_FULL"
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
INVALID_TENSOR = "INVALID_TENSOR"
INVALID_REQUEST = "INVALID_REQUEST"
POSITION_MISMATCH = "POSITION_MISMATCH"
SESSION_CHANGED = "SESSION_CHANGED"
SHUTTING_DOWN = "SHUTTING_DOWN"
INTERNAL = "INTERNAL"


class RnnserveError(Exception):
    """An expected failure of a request: its status code, reason and a message for people.

    ``field`` names the offending request field (e.g. ``inputs["x"].shape``) when there is
    one; the boundary reports it as a ``BadRequest`` field violation.
    """

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.field = field

    def __repr__(self) -> str:
        return f"RnnserveError({self.code.name}, {self.reason}, {self.message!r})"


def invalid(message: str, field: str | None = None) -> RnnserveError:
    """INVALID_ARGUMENT about a tensor or request field."""
    return RnnserveError(grpc.StatusCode.INVALID_ARGUMENT, INVALID_TENSOR, message, field)


class ConfigError(Exception):
    """A model repository that cannot be served; the message names the file and field."""
