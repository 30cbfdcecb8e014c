"""Clients that cancel, time out or vanish mid-call leave the server consistent.

After every fault the session's position says whether the step happened (wholly) or not
(at all); a retry carrying ``expected_position`` then brings the session to the next
position exactly once, and every output matches a session that saw no fault. Slots are not
leaked: the active-sessions gauge returns to where it started.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from rnnserve.v1 import inference_service_pb2 as pb

from .harness import MODEL, ServerProcess, inputs_for, step_request, stub, to_array

SESSIONS = 4
STEPS = 12
FAULTS = ("deadline", "cancel", "disconnect")


def _position(channel: grpc.Channel, session_id: str) -> int:
    reply = stub(channel).GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
    return reply.session.position


def _fault(server: ServerProcess, kind: str, request: pb.StepRequest) -> None:
    """Send ``request`` and abandon it the way ``kind`` says; a fresh channel each time."""
    with grpc.insecure_channel(server.address) as channel:
        service = stub(channel)
        if kind == "deadline":
            try:
                service.Step(request, timeout=0.0005)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        elif kind == "cancel":
            future = service.Step.future(request, timeout=10)
            future.cancel()
        else:  # disconnect: the stream is open and sent its step when the channel goes away
            sent, hold = threading.Event(), threading.Event()

            def requests() -> Iterator[pb.StreamStepsRequest]:
                yield pb.StreamStepsRequest(steps=[request])
                sent.set()
                hold.wait(10)

            call = service.StreamSteps(requests(), timeout=10)
            assert sent.wait(10)
            channel.close()
            hold.set()
            with pytest.raises(grpc.RpcError):
                list(call)


def test_faults_leave_whole_steps_and_retries_apply_once(server: ServerProcess) -> None:
    baseline = server.metric("rnnserve_active_sessions", model=MODEL)
    applied = {kind: 0 for kind in FAULTS}
    abandoned = {kind: 0 for kind in FAULTS}
    with grpc.insecure_channel(server.address) as channel:
        service = stub(channel)
        faulty = [f"fault-{i}" for i in range(SESSIONS)]
        clean = [f"clean-{i}" for i in range(SESSIONS)]
        for session_id in faulty + clean:
            service.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=session_id))
        for step in range(STEPS):
            for index in range(SESSIONS):
                x = inputs_for(index, step, timesteps=1 + step % 3)
                kind = FAULTS[(step + index) % len(FAULTS)]
                before = sum(1 + s % 3 for s in range(step))
                _fault(server, kind, step_request(faulty[index], x, expected_position=before))
                # Whole or nothing: the position is exactly one of the two.
                position_after = _position(channel, faulty[index])
                assert position_after in (before, before + x.shape[0]), (kind, position_after)
                (applied if position_after > before else abandoned)[kind] += 1
                retry = service.Step(
                    step_request(faulty[index], x, expected_position=before), timeout=10
                )
                reference = service.Step(step_request(clean[index], x), timeout=10)
                assert retry.position == reference.position == before + x.shape[0]
                assert retry.outputs["Y"].data == reference.outputs["Y"].data
        for index in range(SESSIONS):
            got = service.ExportState(pb.ExportStateRequest(session_id=faulty[index]))
            want = service.ExportState(pb.ExportStateRequest(session_id=clean[index]))
            assert got.session.position == want.session.position
            for name in want.state:
                assert np.array_equal(to_array(got.state[name]), to_array(want.state[name]))
        assert server.metric("rnnserve_active_sessions", model=MODEL) == baseline + 2 * SESSIONS
        for session_id in faulty + clean:
            service.CloseSession(pb.CloseSessionRequest(session_id=session_id))
    assert server.metric("rnnserve_active_sessions", model=MODEL) == baseline
    assert server.process is not None and server.process.poll() is None
    print(f"faults injected: applied {applied}, not applied {abandoned}")
