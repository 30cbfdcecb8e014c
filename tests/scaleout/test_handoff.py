"""Handoff between replicas: a replica that drains (SIGTERM) writes its sessions to the
shared Redis, and the replica Envoy then routes them to takes each one back on its next call.

Two real ``rnnserve serve`` replicas with the same ``--state-store`` sit behind Envoy (ring
hash on the session header, as deployed). The SDK steps many sessions concurrently with
``expected_position`` on every step and retries UNAVAILABLE; one replica is sent SIGTERM
mid-load. Every session's outputs and final state must equal one uninterrupted onnxruntime
run, and its positions must read 1, 2, ..., N: no step lost, none applied twice, none on
stale state.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest
from deploy.tools import http_get, wait_until
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .handoff import check_against_reference, step_through
from .redis_server import RedisServer, left_behind
from .topology import envoy_in_front, healthy_hosts


def reason_of(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("rnnserve-error-reason", "")


SESSIONS = 40
STEPS = 25


def _holds(address: str, session_ids: list[str]) -> int:
    """How many of ``session_ids`` the replica at ``address`` holds right now."""
    held = 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for session_id in session_ids:
            with contextlib.suppress(grpc.RpcError):
                stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=5)
                held += 1
    return held


def _unparks(server: ServerProcess) -> float:
    status, body = http_get(server.metrics_url)
    assert status == 200
    found = re.findall(r"^rnnserve_unparks_total\{[^}]*\} ([0-9.e+]+)$", body.decode(), re.M)
    return sum(float(v) for v in found)


async def test_drained_replica_hands_its_sessions_to_the_other_through_redis(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    args = ("--state-store", redis_server.url, "--state-store-prefix", "handoff:")
    args += ("--grace-s", "5")
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(ServerProcess(scaleout_repository, *args)) for _ in "ab"]
        envoy = stack.enter_context(
            envoy_in_front([("127.0.0.1", r.grpc_port) for r in replicas], tmp_path)
        )
        leaving, staying = replicas

        def drain() -> None:
            assert leaving.process is not None
            leaving.process.send_signal(signal.SIGTERM)

        run = await step_through(envoy.address, SESSIONS, STEPS, drain, drain_after=0.3)

        assert leaving.process is not None
        assert await asyncio.to_thread(leaving.process.wait, 30) == 0
        handed = re.search(r"event=handoff store=\S+ sessions=(\d+) left=0", leaving.stderr())
        assert handed is not None, leaving.stderr()[-3000:]
        moved = int(handed.group(1))
        assert moved > 0, "the drained replica held no session (ring hash put all on one)"
        # Each handed-off session was taken back by the other replica, once.
        assert _unparks(staying) >= moved
        assert _holds(staying.address, list(run.inputs)) == SESSIONS
        # Nothing left behind but the records of which replica holds each session.
        assert not left_behind(redis_server.client(), "handoff:*")
        wait_until("envoy to drop the drained replica", lambda: healthy_hosts(envoy.admin) == 1)
    check_against_reference(run, scaleout_repository)


def test_a_call_that_arrives_before_the_handoff_is_told_to_retry_not_that_the_session_is_gone(
    scaleout_repository: Path, redis_server: RedisServer
) -> None:
    """The window between a drain starting and its sessions reaching Redis.

    A draining replica first marks its sessions as moving, then writes them. A call reaching
    the other replica inside that window must get UNAVAILABLE (retry) rather than NOT_FOUND,
    and succeed once the session is written. The window is held open here by marking the
    session the way the drain does, before the drain itself starts.
    """
    args = ("--state-store", redis_server.url, "--state-store-prefix", "window:")
    x = np.zeros((1, 4), np.float32)
    with ServerProcess(scaleout_repository, *args) as leaving:
        with ServerProcess(scaleout_repository, *args) as staying:
            with grpc.insecure_channel(leaving.address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru")).session.session_id
                first = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x)}))
            redis_server.client().set(f"window:anonymous/{sid}#moving", b"1", px=30_000)
            with grpc.insecure_channel(staying.address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                request = pb.StepRequest(
                    session_id=sid, inputs={"x": from_array(x)}, expected_position=1
                )
                with pytest.raises(grpc.RpcError) as caught:
                    stub.Step(request)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert reason_of(caught.value) == "SESSION_MOVING"
                assert leaving.stop() == 0  # the drain writes the session and clears the mark
                assert "event=handoff_begin" in leaving.stderr()
                second = stub.Step(request)
            assert (first.position, second.position) == (1, 2)
            assert not left_behind(redis_server.client(), "window:*")  # who holds what only
