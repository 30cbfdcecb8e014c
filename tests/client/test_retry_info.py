"""The server's google.rpc.RetryInfo: exposed on the exception, waited before a retry, and
never waited past the call's deadline (``ClientOptions.timeout`` bounds the whole call).

The peer here is a scripted server, not rnnserve's: a small grpc.aio server implementing
``rnnserve.v1.InferenceService`` (ListModels, and GetModel, OpenSession and ExportState for
the open tests) that aborts each call with the next rich status of its script (code,
ErrorInfo reason and metadata, RetryInfo, exactly as rnnserve's ``server/frontend/status.py``
writes them) and answers OK once the script is spent. It lets a test choose a delay and a
status the real server only sends in a passing window (a drain, a handoff, a Redis outage);
those windows are reached with the real server in ``test_retry_during_handoff.py``. The SDK
talks to it over real gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from rnnserve.client import (
    AlreadyExists,
    AsyncClient,
    CapacityExceeded,
    ClientOptions,
    DeadlineExceeded,
    Unavailable,
)
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc


@dataclass
class Failure:
    """One scripted answer: a status with an ErrorInfo, and a RetryInfo when ``retry_s``."""

    code: grpc.StatusCode
    reason: str = ""
    retry_s: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    hold_s: float = 0.0  # how long the call takes before it fails


class ScriptedService(pb_grpc.InferenceServiceServicer):  # type: ignore[misc]
    """ListModels fails with each status of ``script`` in turn, then answers OK; OpenSession
    likewise with ``open_script`` (GetModel, after ``model_hold_s``, and ExportState answer,
    and are counted)."""

    def __init__(self) -> None:
        self.script: list[Failure] = []
        self.arrivals: list[float] = []
        self.open_script: list[Failure] = []
        self.calls: list[str] = []
        self.model_hold_s = 0.0  # how long GetModel takes before it answers

    async def ListModels(  # noqa: N802 (the gRPC method's name)
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self.arrivals.append(time.monotonic())
        if self.script:
            await _abort(context, self.script.pop(0))
        return pb.ListModelsResponse()

    async def GetModel(  # noqa: N802
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelResponse:
        self.calls.append("GetModel")
        await asyncio.sleep(self.model_hold_s)
        return pb.GetModelResponse(model=pb.Model(name=request.name, version="1"))

    async def OpenSession(  # noqa: N802
        self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenSessionResponse:
        self.calls.append("OpenSession")
        if self.open_script:
            await _abort(context, self.open_script.pop(0))
        return pb.OpenSessionResponse(session=_session(request.session_id, request.model))

    async def ExportState(  # noqa: N802
        self, request: pb.ExportStateRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExportStateResponse:
        self.calls.append("ExportState")
        return pb.ExportStateResponse(session=_session(request.session_id, "m"))

    def gaps(self) -> list[float]:
        """Seconds between consecutive arrivals."""
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]


def _session(session_id: str, model: str) -> pb.Session:
    """A session just opened: position 0, never used."""
    session = pb.Session(session_id=session_id, model=model, version="1")
    session.create_time.FromNanoseconds(1_000_000_000)
    session.last_use_time.FromNanoseconds(1_000_000_000)
    return session


async def _abort(context: grpc.aio.ServicerContext, failure: Failure) -> None:
    """End the call with ``failure``'s status, as rnnserve's server/frontend/status.py does."""
    await asyncio.sleep(failure.hold_s)
    details = []
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=failure.reason, domain="rnnserve", metadata=failure.metadata
        )
    )
    details.append(info)
    if failure.retry_s is not None:
        retry = any_pb2.Any()
        seconds = int(failure.retry_s)
        nanos = int(round((failure.retry_s - seconds) * 1e9))
        retry.Pack(
            error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
            )
        )
        details.append(retry)
    message = f"scripted {failure.code.name}"
    status = status_pb2.Status(code=failure.code.value[0], message=message, details=details)
    trailers = (
        ("grpc-status-details-bin", status.SerializeToString()),
        ("rnnserve-error-reason", failure.reason),
    )
    await context.abort(failure.code, message, trailers)
    raise AssertionError("abort never returns")


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedService, str]]:
    """The scripted peer on a free loopback port, and its address."""
    service = ScriptedService()
    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


MOVING = Failure(grpc.StatusCode.UNAVAILABLE, "SESSION_MOVING", 0.2, metadata={"session_id": "s-1"})


async def test_the_servers_retry_delay_is_on_the_exception(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, address = scripted
    service.script = [MOVING]
    async with AsyncClient(address, options=ClientOptions(retries=0)) as client:
        with pytest.raises(Unavailable) as caught:
            await client.list_models()
    error = caught.value
    assert error.retry_after == pytest.approx(0.2)
    assert error.reason == "SESSION_MOVING"
    assert error.metadata == {"session_id": "s-1"}
    assert error.message == "scripted UNAVAILABLE"


async def test_no_retry_info_means_no_retry_after(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, address = scripted
    service.script = [Failure(grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")]
    async with AsyncClient(address, options=ClientOptions(retries=0)) as client:
        with pytest.raises(Unavailable) as caught:
            await client.list_models()
    assert caught.value.retry_after is None
    assert caught.value.reason == "SHUTTING_DOWN"


async def test_a_status_that_is_not_retried_still_carries_its_delay(
    scripted: tuple[ScriptedService, str],
) -> None:
    """RESOURCE_EXHAUSTED (QUOTA_EXCEEDED, as the server's per-identity step limit sends it)
    is not retried by the SDK; the caller gets the server's delay to decide for itself."""
    service, address = scripted
    service.script = [Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED", 0.1)]
    async with AsyncClient(address, options=ClientOptions(retries=3)) as client:
        with pytest.raises(CapacityExceeded) as caught:
            await client.list_models()
    assert caught.value.retry_after == pytest.approx(0.1)
    assert len(service.arrivals) == 1


async def test_retries_wait_at_least_the_servers_delay(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, address = scripted
    service.script = [MOVING, MOVING]
    options = ClientOptions(retries=3, backoff=0.0)  # the SDK's own backoff would not wait
    async with AsyncClient(address, options=options) as client:
        await client.list_models()
    assert len(service.arrivals) == 3
    assert all(gap >= 0.19 for gap in service.gaps()), service.gaps()


async def test_the_servers_delay_is_capped_at_max_backoff(
    scripted: tuple[ScriptedService, str],
) -> None:
    service, address = scripted
    service.script = [Failure(grpc.StatusCode.UNAVAILABLE, "DRAINING", 30.0)]
    options = ClientOptions(retries=1, backoff=0.0, max_backoff=0.3)
    async with AsyncClient(address, options=options) as client:
        await client.list_models()
    (gap,) = service.gaps()
    assert 0.29 <= gap < 5.0


async def test_a_wait_that_would_pass_the_deadline_is_not_taken(
    scripted: tuple[ScriptedService, str],
) -> None:
    """With 1 s for the whole call and the server asking for 0.6 s between tries, the
    second failure is raised at once: a third try could not start before the deadline."""
    service, address = scripted
    delayed = Failure(grpc.StatusCode.UNAVAILABLE, "DRAINING", 0.6)
    service.script = [delayed, delayed, delayed]
    options = ClientOptions(timeout=1.0, retries=5, backoff=0.0)
    async with AsyncClient(address, options=options) as client:
        started = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            await client.list_models()
        elapsed = time.monotonic() - started
    assert len(service.arrivals) == 2
    assert caught.value.retry_after == pytest.approx(0.6)
    assert 0.55 <= elapsed < 1.0


async def test_timeout_bounds_the_whole_call_retries_included(
    scripted: tuple[ScriptedService, str],
) -> None:
    """Each try takes 0.4 s and fails UNAVAILABLE: with ``timeout=1.0`` the call ends after
    about 1 s (the third try gets what is left), not after six tries of 0.4 s."""
    service, address = scripted
    slow = Failure(grpc.StatusCode.UNAVAILABLE, "", hold_s=0.4)
    service.script = [slow] * 6
    options = ClientOptions(timeout=1.0, retries=5, backoff=0.0)
    async with AsyncClient(address, options=options) as client:
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.list_models()
        elapsed = time.monotonic() - started
    assert elapsed < 1.5
    assert 2 <= len(service.arrivals) <= 3  # 3 unless the machine is slow


async def test_timeout_bounds_an_open_that_first_reads_its_model(
    scripted: tuple[ScriptedService, str],
) -> None:
    """The model's description (GetModel, read at a model's first use) comes out of the
    call's one deadline: it used to get a deadline of its own, and the open a fresh one."""
    service, address = scripted
    service.model_hold_s = 0.7
    slow = Failure(grpc.StatusCode.UNAVAILABLE, "", hold_s=0.4)
    service.open_script = [slow] * 6
    options = ClientOptions(timeout=1.0, retries=5, backoff=0.0)
    async with AsyncClient(address, options=options) as client:
        started = time.monotonic()
        with pytest.raises((Unavailable, DeadlineExceeded)):
            await client.open_session("m", session_id="s-1")
        elapsed = time.monotonic() - started
    assert elapsed < 1.3


async def test_the_delay_is_read_without_grpcio_status_too(
    scripted: tuple[ScriptedService, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpcio-status is no dependency of the SDK: without it the details are parsed directly."""
    monkeypatch.setitem(sys.modules, "grpc_status", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "grpc_status.rpc_status", None)
    service, address = scripted
    service.script = [MOVING]
    async with AsyncClient(address, options=ClientOptions(retries=0)) as client:
        with pytest.raises(Unavailable) as caught:
            await client.list_models()
    assert caught.value.retry_after == pytest.approx(0.2)
    assert caught.value.reason == "SESSION_MOVING"
    assert caught.value.metadata == {"session_id": "s-1"}


async def test_an_open_refused_by_the_server_then_already_exists_is_not_taken_for_its_own(
    scripted: tuple[ScriptedService, str],
) -> None:
    """A DRAINING refusal says the open was not applied: the retry's ALREADY_EXISTS is
    another session's, raised as it is (the SDK does not read the session to adopt it)."""
    service, address = scripted
    service.open_script = [
        Failure(grpc.StatusCode.UNAVAILABLE, "DRAINING", 0.0),
        Failure(grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS"),
    ]
    options = ClientOptions(retries=2, backoff=0.0)
    async with AsyncClient(address, options=options) as client:
        with pytest.raises(AlreadyExists):
            await client.open_session("m", session_id="s-1")
    assert service.calls == ["GetModel", "OpenSession", "OpenSession"]


async def test_an_open_whose_outcome_is_unknown_then_already_exists_takes_the_fresh_session(
    scripted: tuple[ScriptedService, str],
) -> None:
    """An UNAVAILABLE without a server's reason may have opened the session: the retry's
    ALREADY_EXISTS is checked (ExportState) and the untouched session taken."""
    service, address = scripted
    service.open_script = [
        Failure(grpc.StatusCode.UNAVAILABLE, ""),
        Failure(grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS"),
    ]
    options = ClientOptions(retries=2, backoff=0.0)
    async with AsyncClient(address, options=options) as client:
        session = await client.open_session("m", session_id="s-1")
    assert session.session_id == "s-1"
    assert service.calls == ["GetModel", "OpenSession", "OpenSession", "ExportState"]
