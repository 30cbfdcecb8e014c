"""rnnserve.client: the Python SDK (needs only grpcio, protobuf and numpy).

    from rnnserve.client import Client

    with Client("127.0.0.1:50051") as client, client.open_session("tiny_lstm") as session:
        y = session.step(x)  # x: (T, 4) float32; the server keeps the state between steps

``AsyncClient`` is the asyncio core, ``Client`` its blocking twin. Every error is an
``RnnserveError`` subclass; no gRPC type needs catching. Unary calls are retried after
UNAVAILABLE and DEADLINE_EXCEEDED, each safely (``AsyncClient`` says why), waiting at least
the delay the server asks for (``RnnserveError.retry_after``), within ``ClientOptions.timeout``
for the whole call (``ClientOptions`` has the details).
"""

from __future__ import annotations

from ._async_client import AsyncClient, AsyncSession
from ._exceptions import (
    AlreadyExists,
    CapacityExceeded,
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
from ._models import ExportedState, ModelInfo, Prediction, SessionInfo, StateInfo, TensorInfo
from ._options import ClientOptions
from ._stream import AsyncStepStream
from ._sync_client import Client, Session, StepStream

__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AsyncSession",
    "AsyncStepStream",
    "CapacityExceeded",
    "Client",
    "ClientOptions",
    "DeadlineExceeded",
    "ExportedState",
    "FailedPrecondition",
    "InvalidInput",
    "ModelInfo",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "PositionMismatch",
    "Prediction",
    "RnnserveError",
    "ServerError",
    "Session",
    "SessionClosed",
    "SessionEvicted",
    "SessionExpired",
    "SessionInfo",
    "SessionNotFound",
    "StateInfo",
    "StepStream",
    "TensorInfo",
    "Unauthenticated",
    "Unavailable",
    "VersionRetiring",
]

# Present every public name as belonging to the package, as tracebacks and docs show it.
for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
