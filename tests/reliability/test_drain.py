"""The drain gate on a real gRPC server: running calls finish, new ones get a retry hint."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rnnserve.server.frontend.drain import Drain
from rnnserve.server.frontend.handlers import wrap_handler
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, build_test_repository
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

SLOW = "/rnnserve.test.Slow/Wait"


async def test_drain_finishes_running_calls_and_refuses_new_ones() -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started.set()
        await release.wait()
        return b"done"

    drain = Drain(retry_after_s=1.5)
    server = grpc.aio.server()
    handler = wrap_handler(grpc.unary_unary_rpc_method_handler(wait), drain.admit)  # as served
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("rnnserve.test.Slow", {"Wait": handler})]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            running = asyncio.ensure_future(channel.unary_unary(SLOW)(b"", timeout=10))
            await asyncio.wait_for(started.wait(), 10)
            assert drain.in_flight == 1
            drain.begin()
            assert not await drain.wait_idle(0.05)  # the running call holds the drain
            refused = channel.unary_unary(SLOW)(b"", timeout=10)
            try:
                await refused
                raise AssertionError("a new call was admitted while draining")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
            metadata = list(await refused.trailing_metadata())
            details = dict(metadata)["grpc-status-details-bin"]
            status = status_pb2.Status.FromString(details)
            assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert retry.retry_delay.seconds == 1 and retry.retry_delay.nanos == 500_000_000
            assert ("rnnserve-error-reason", "DRAINING") in metadata
            # Probes still pass the gate.
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            release.set()
            assert await running == b"done"
            assert await drain.wait_idle(10)
            assert drain.in_flight == 0
    finally:
        await server.stop(None)


async def test_an_open_stream_ends_with_draining_after_its_steps_are_answered(
    tmp_path: Path,
) -> None:
    """SIGTERM while a StreamSteps call is open: every step already sent is answered, then the
    call ends UNAVAILABLE with reason DRAINING and a RetryInfo (not a bare cancellation)."""
    repository = build_test_repository(tmp_path / "repository")
    with ServerProcess(repository, "--grace", "5") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            sid = (
                await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
            ).session.session_id
            call = stub.StreamSteps()
            x = {"x": from_array(np.zeros((1, 4), np.float32))}
            for n in range(3):
                await call.write(
                    pb.StreamStepsRequest(
                        steps=[pb.StepRequest(session_id=sid, request_id=str(n), inputs=x)]
                    )
                )
            answered = []
            while len(answered) < 3:
                answered += [r.response.position for r in (await call.read()).results]
            assert answered == [1, 2, 3]
            server.signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    message = await call.read()
                    assert message is not grpc.aio.EOF, "the stream ended without a status"
            error = ended.value
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            trailers = dict(error.trailing_metadata())
            assert trailers["rnnserve-error-reason"] == "DRAINING"
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            kinds = {detail.type_url.rsplit("/", 1)[-1] for detail in status.details}
            assert error_details_pb2.RetryInfo.DESCRIPTOR.full_name in kinds
        assert server.wait(30) == 0


async def test_sigterm_keeps_to_the_grace_period_with_streams_open(tmp_path: Path) -> None:
    """Streams that stay open and idle do not hold a stop past ``--grace``: the whole stop
    (drain, streams ended DRAINING, engine stopped) fits in the grace period plus the time to
    exit. Before, ``--grace 2`` took twice that: the grace was waited out twice."""
    import time

    grace_s = 3.0
    repository = build_test_repository(tmp_path / "repository")
    with ServerProcess(repository, "--grace", str(grace_s)) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            calls = []
            for _ in range(4):
                sid = (
                    await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
                ).session.session_id
                call = stub.StreamSteps()
                x = {"x": from_array(np.zeros((1, 4), np.float32))}
                await call.write(
                    pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=sid, inputs=x)])
                )
                assert (await call.read()).results[0].response.position == 1
                calls.append(call)  # left open, idle: the client neither writes nor closes
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.wait, 30) == 0
            took = time.monotonic() - started
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    # Generous for a loaded machine, yet short of two grace periods.
    assert took < grace_s + 2.5, f"stop took {took:.1f} s with --grace {grace_s}"
