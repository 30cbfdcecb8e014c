"""Restarts lose no session: SIGTERM drains and snapshots, kill -9 loses at most an interval.

Each test runs real ``rnnserve serve`` processes against one snapshot path, interrupts them,
starts a new one, and checks that the sessions continue exactly where the outputs of an
uninterrupted run say they should.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server.engine.snapshot import read_snapshot
from rnnserve.v1 import inference_service_pb2 as pb

from .harness import (
    MODEL,
    ServerProcess,
    build_lstm,
    build_repository,
    inputs_for,
    step_request,
    stub,
)

SESSIONS = 16
TOTAL_STEPS = 40


def _open_all(target: str, count: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    with grpc.insecure_channel(target) as channel:
        for session_id in ids:
            stub(channel).OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=session_id))
    return ids


def _reference(target: str, steps: int) -> list[list[bytes]]:
    """Outputs of sessions stepped straight through on one server: the run to match."""
    ids = _open_all(target, SESSIONS, "reference")
    outputs: list[list[bytes]] = [[] for _ in ids]
    with grpc.insecure_channel(target) as channel:
        for index, session_id in enumerate(ids):
            for step in range(steps):
                reply = stub(channel).Step(step_request(session_id, inputs_for(index, step)))
                outputs[index].append(reply.outputs["Y"].data)
            stub(channel).CloseSession(pb.CloseSessionRequest(session_id=session_id))
    return outputs


def _step_until_stopped(
    target: str, session_id: str, index: int, got: list[bytes], stop_at: int
) -> None:
    """Step one session until ``stop_at`` or until the server stops answering."""
    with grpc.insecure_channel(target) as channel:
        service = stub(channel)
        for step in range(len(got), stop_at):
            try:
                reply = service.Step(
                    step_request(session_id, inputs_for(index, step), expected_position=step),
                    timeout=10,
                )
            except grpc.RpcError as exc:
                # rnnserve refuses with UNAVAILABLE once draining; a call that arrives while
                # gRPC itself is closing the port is CANCELLED by gRPC. Either way the step was
                # applied wholly or not at all, which _continue tells apart by position.
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                return
            assert reply.position == step + 1
            got.append(reply.outputs["Y"].data)


def _continue(target: str, ids: list[str], outputs: list[list[bytes]]) -> list[int]:
    """After a restart: resume every session from its restored position to TOTAL_STEPS."""
    restored: list[int] = []
    with grpc.insecure_channel(target) as channel:
        service = stub(channel)
        for index, session_id in enumerate(ids):
            position = service.GetSession(pb.GetSessionRequest(session_id=session_id)).session
            restored.append(position.position)
            # A step applied but whose reply was lost: ask for it again, it is not re-applied.
            if position.position == len(outputs[index]) + 1:
                step = len(outputs[index])
                retry = service.Step(
                    step_request(session_id, inputs_for(index, step), expected_position=step)
                )
                assert retry.position == step + 1
                outputs[index].append(retry.outputs["Y"].data)
            del outputs[index][position.position :]  # steps lost since the last snapshot
            for step in range(position.position, TOTAL_STEPS):
                reply = service.Step(
                    step_request(session_id, inputs_for(index, step), expected_position=step)
                )
                outputs[index].append(reply.outputs["Y"].data)
    return restored


def _server(repository: Path, snapshot: Path, log: Path, *args: str) -> ServerProcess:
    return ServerProcess(
        repository, "--snapshot", str(snapshot), "--grace-s", "10", *args, log_path=log
    ).start()


def test_sigterm_mid_load_loses_no_session(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    snapshot = tmp_path / "sessions.snap"
    first = _server(repository, snapshot, tmp_path / "first.log")
    ids = _open_all(first.address, SESSIONS, "s")
    outputs: list[list[bytes]] = [[] for _ in ids]
    workers = [
        threading.Thread(
            target=_step_until_stopped, args=(first.address, sid, i, outputs[i], TOTAL_STEPS)
        )
        for i, sid in enumerate(ids)
    ]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while sum(map(len, outputs)) < SESSIONS * TOTAL_STEPS // 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.signal(signal.SIGTERM)
    refused = _probe_while_draining(first.address)
    assert first.wait(30) == 0, first.stderr()
    for worker in workers:
        worker.join(30)
    assert snapshot.exists() and len(read_snapshot(snapshot).sessions) == SESSIONS
    mid = [len(o) for o in outputs]
    assert 0 < sum(mid) < SESSIONS * TOTAL_STEPS, "the SIGTERM did not land mid-load"

    second = _server(repository, snapshot, tmp_path / "second.log")
    try:
        restored = _continue(second.address, ids, outputs)
        assert all(position >= seen for position, seen in zip(restored, mid, strict=True))
        assert outputs == _reference(second.address, TOTAL_STEPS)
    finally:
        second.stop()
    print(f"sessions restored after SIGTERM: {SESSIONS}; positions {restored}; refused {refused}")


def _probe_while_draining(target: str) -> dict[str, int]:
    """New calls after SIGTERM: all UNAVAILABLE; those the server answers carry RetryInfo."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    seen = {"unavailable": 0, "with_retry_info": 0}
    with grpc.insecure_channel(target) as channel:
        for _ in range(200):
            try:
                stub(channel).OpenSession(pb.OpenSessionRequest(model=MODEL), timeout=2)
                continue  # accepted before the signal was handled; closed by the snapshot
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    break  # gRPC itself cancelled it while closing the port: no server answer
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                seen["unavailable"] += 1
                status = rpc_status.from_call(exc)  # type: ignore[arg-type]
                if status is None:
                    break  # the port is closed: the transport answered, not the server
                for detail in status.details:
                    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        seen["with_retry_info"] += 1
                        break
                else:
                    pytest.fail(f"UNAVAILABLE without RetryInfo: {status}")
    return seen


def test_kill_9_loses_at_most_the_snapshot_interval(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    snapshot = tmp_path / "sessions.snap"
    first = _server(repository, snapshot, tmp_path / "first.log", "--snapshot-interval-s", "0.5")
    ids = _open_all(first.address, SESSIONS, "k")
    outputs: list[list[bytes]] = [[] for _ in ids]
    for index, session_id in enumerate(ids):
        _step_until_stopped(first.address, session_id, index, outputs[index], 10)
    # Wait (bounded) for a periodic snapshot that holds those ten steps.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if snapshot.exists():
            positions = {r.session_id: r.position for r in read_snapshot(snapshot).sessions}
            if all(positions.get(session_id) == 10 for session_id in ids):
                break
        time.sleep(0.1)
    else:
        pytest.fail("no periodic snapshot within 20 s")
    for index, session_id in enumerate(ids):
        _step_until_stopped(first.address, session_id, index, outputs[index], 13)
    first.signal(signal.SIGKILL)
    first.wait(10)

    second = _server(repository, snapshot, tmp_path / "second.log")
    try:
        restored = _continue(second.address, ids, outputs)
        assert all(10 <= position <= 13 for position in restored), restored
        assert outputs == _reference(second.address, TOTAL_STEPS)
    finally:
        second.stop()
    print(f"sessions restored after kill -9: {SESSIONS}; positions {restored}")


def _snapshot_of_sessions(tmp_path: Path, repository: Path, snapshot: Path) -> list[str]:
    server = _server(repository, snapshot, tmp_path / "writer.log")
    ids = _open_all(server.address, 3, "m")
    for index, session_id in enumerate(ids):
        _step_until_stopped(server.address, session_id, index, [], 2)
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    return ids


def test_corrupt_snapshot_is_reported_and_never_loaded(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    snapshot = tmp_path / "sessions.snap"
    ids = _snapshot_of_sessions(tmp_path, repository, snapshot)
    raw = bytearray(snapshot.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    snapshot.write_bytes(bytes(raw))
    server = _server(repository, snapshot, tmp_path / "reader.log")
    try:
        _assert_none_restored(server, ids)
        assert (tmp_path / "sessions.snap.corrupt").read_bytes() == bytes(raw)
        assert "checksum" in server.stderr()
    finally:
        server.stop()


@pytest.mark.parametrize("change", ["version", "weights"])
def test_snapshot_of_another_model_is_skipped(tmp_path: Path, change: str) -> None:
    repository = build_repository(tmp_path / "repository")
    snapshot = tmp_path / "sessions.snap"
    ids = _snapshot_of_sessions(tmp_path, repository, snapshot)
    if change == "version":  # version 1 is gone, version 2 is served instead
        shutil.move(repository / MODEL / "1", repository / MODEL / "2")
    else:  # same version number, other weights: the saved state means nothing to them
        build_lstm(repository / MODEL / "1" / "model.onnx", seed=99)
    server = _server(repository, snapshot, tmp_path / "reader.log")
    try:
        _assert_none_restored(server, ids)
        assert "skipped" in server.stderr()
    finally:
        server.stop()


def _assert_none_restored(server: ServerProcess, ids: list[str]) -> None:
    with grpc.insecure_channel(server.address) as channel:
        for session_id in ids:
            with pytest.raises(grpc.RpcError) as caught:
                stub(channel).GetSession(pb.GetSessionRequest(session_id=session_id))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        # The server serves normally.
        stub(channel).OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="fresh"))
        reply = stub(channel).Step(step_request("fresh", np.zeros((1, 4), np.float32)))
        assert reply.position == 1


def _refused_at_start(repository: Path, *flags: str) -> str:
    """``rnnserve serve`` with ``flags`` must exit 2 before serving; its stderr."""
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.server", "serve", "--repository", str(repository),
            *(() if "--port" in flags else ("--port", "0")),
            *(() if "--metrics-port" in flags else ("--metrics-port", "-1")), *flags,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr


def test_flags_that_would_lose_sessions_at_shutdown_are_refused_at_start(tmp_path: Path) -> None:
    # An unwritable --snapshot used to be found at SIGTERM, when the write failed and every
    # session was lost; a negative interval rewrote the snapshot in a tight loop.
    repository = build_repository(tmp_path / "repository")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    stderr = _refused_at_start(
        repository,
        "--snapshot", str(blocker / "sessions.snap"),
        "--snapshot-interval-s", "-1",
        "--grace", "-5",
    )  # fmt: skip
    assert f"--snapshot {blocker / 'sessions.snap'}: cannot write in {blocker}" in stderr
    assert "--snapshot-interval-s must be > 0, got -1.0" in stderr
    assert "--grace must be >= 0, got -5.0" in stderr
    stderr = _refused_at_start(repository, "--snapshot-interval-s", "5")
    assert "--snapshot-interval-s needs --snapshot" in stderr
    stderr = _refused_at_start(repository, "--snapshot", str(tmp_path))
    assert "is a folder; name a file" in stderr


def test_numbers_out_of_range_are_refused_at_start_naming_the_flag(tmp_path: Path) -> None:
    # --port 70000 used to listen on 4464 (the number wrapped), --port -3 on 65533.
    repository = build_repository(tmp_path / "repository")
    stderr = _refused_at_start(
        repository, "--port", "70000", "--max-sessions-per-identity", "-2", "--health-port", "-1"
    )
    assert "--port must be between 0 and 65535 (0: any free port), got 70000" in stderr
    assert "--max-sessions-per-identity must be >= 0 (0: no quota), got -2" in stderr
    assert "--health-port must be between 0 and 65535, got -1" in stderr
    stderr = _refused_at_start(repository, "--metrics-port", "-7")
    assert "--metrics-port must be between -1 (none) and 65535, got -7" in stderr
    stderr = _refused_at_start(repository, "--log-level", "verbose")  # was a traceback
    assert "Invalid value for '--log-level'" in stderr and "Traceback" not in stderr
