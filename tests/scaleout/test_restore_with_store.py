"""A replica restarted from its snapshot while it shares a state store with others.

Sessions restored from the snapshot were put back into slots without a word to the store:
no holder record named the restarted process (a new replica id), so another replica asked
for such a session answered NOT_FOUND and let its client open the id again (two sessions of
one id, on two replicas); and a session another replica had opened under that id while this
one was down (or that was parked after the snapshot was written) was served here too, from
the snapshot's stale copy. A restored session must claim its id in the store first, as an
open does: held here (so other replicas call it back), or not restored when the store has
the id already.

Real ``rnnserve serve`` processes share a real ``redis-server``; the first is killed (-9)
after a periodic snapshot, then started again on that snapshot.
"""

from __future__ import annotations

import itertools
import signal
import time
from pathlib import Path

import grpc
import pytest
from rnnserve.server.engine.snapshot import read_snapshot
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import TIMEOUT_S, inputs, metadata, open_session, step

_prefixes = itertools.count()
SESSION = "restored-1"


def _store_args(redis_server: RedisServer) -> tuple[str, ...]:
    prefix = f"restorestore{next(_prefixes)}:"
    return ("--state-store", redis_server.url, "--state-store-prefix", prefix)


def _position(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GetSessionRequest(session_id=SESSION)
        reply = stub.GetSession(request, metadata=metadata(SESSION), timeout=TIMEOUT_S)
        return reply.session.position


def _killed_after_snapshot(
    repository: Path, store: tuple[str, ...], snapshot: Path, steps: int
) -> None:
    """Open ``SESSION`` on a replica with a periodic snapshot, step it ``steps`` times, wait
    (bounded) for a snapshot holding that position, and kill the replica (-9)."""
    first = ServerProcess(
        repository, *store, "--snapshot", str(snapshot), "--snapshot-interval-s", "0.2"
    ).start()
    try:
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            open_session(stub, SESSION)
            for x in inputs(0, steps):
                step(stub, SESSION, x)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if snapshot.exists():
                saved = {r.session_id: r.position for r in read_snapshot(snapshot).sessions}
                if saved.get(SESSION) == steps:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("no periodic snapshot within 30 s")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()


def test_a_restored_session_is_held_so_another_replica_calls_it_back(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = _store_args(redis_server)
    snapshot = tmp_path / "sessions.snap"
    with ServerProcess(scaleout_repository, *store) as other:
        _killed_after_snapshot(scaleout_repository, store, snapshot, 3)
        with ServerProcess(scaleout_repository, *store, "--snapshot", str(snapshot)) as again:
            assert _position(again.address) == 3  # restored there
            with grpc.insecure_channel(other.address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                # The id is taken: opening it again elsewhere would make a second session.
                with pytest.raises(grpc.RpcError) as refused:
                    open_session(stub, SESSION)
                assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
                # And the other replica gets it by calling the restarted one back.
                reply = step(stub, SESSION, inputs(0, 4)[3], expected_position=3)
                assert reply.position == 4


def test_a_session_opened_elsewhere_meanwhile_is_not_restored_from_the_stale_snapshot(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    store = _store_args(redis_server)
    snapshot = tmp_path / "sessions.snap"
    with ServerProcess(scaleout_repository, *store) as other:
        _killed_after_snapshot(scaleout_repository, store, snapshot, 3)
        # The client, told NOT_FOUND by the other replica, opens the id there afresh.
        with grpc.insecure_channel(other.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            open_session(stub, SESSION)
            step(stub, SESSION, inputs(1, 1)[0])
        with ServerProcess(scaleout_repository, *store, "--snapshot", str(snapshot)) as again:
            # One session of that id: the one opened elsewhere (position 1), wherever asked.
            assert _position(again.address) == 1
            assert _position(other.address) == 1
