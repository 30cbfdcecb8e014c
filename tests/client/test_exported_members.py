"""The public API is exactly what rnnserve.client re-exports; changing it is deliberate."""

from __future__ import annotations

import rnnserve.client

EXPECTED = {
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
}


def test_all_is_the_deliberate_public_api() -> None:
    assert set(rnnserve.client.__all__) == EXPECTED
    assert len(rnnserve.client.__all__) == len(EXPECTED)


def test_public_names_belong_to_the_package() -> None:
    public = {
        name
        for name, value in vars(rnnserve.client).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == "rnnserve.client"
    }
    assert public == EXPECTED
    for name in EXPECTED:
        assert getattr(rnnserve.client, name).__module__ == "rnnserve.client"
