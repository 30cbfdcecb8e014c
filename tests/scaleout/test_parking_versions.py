"""Parking and model versions: a session on a version loaded while the server runs parks and
comes back onto that version; a retiring version waits for the sessions parked to come back
to it, and an operator's MoveSession empties it of them (tests/scaleout/test_move_parked.py
has the cases in detail, and what a session parked on a released version answers).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
import numpy as np
from deploy.tools import wait_until
from rnnserve.server.app import session_listener
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.lifecycle import VersionStatus
from rnnserve.server.engine.state_store import RedisStateStore, StoreUnavailable
from rnnserve.server.frontend.tensors import from_array, to_array
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import ServerProcess, build_test_repository, run_reference
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer

PREFIX = "versions:"
KEY = PREFIX + "anonymous/"  # parked sessions are keyed <prefix><owner>/<id>


def _x(seed: int, timesteps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


def test_parked_sessions_keep_their_version(tmp_path: Path, redis_server: RedisServer) -> None:
    repo = build_test_repository(tmp_path / "repo")
    shutil.move(repo / "tiny_lstm" / "2", tmp_path / "spare-2")
    args = ("--state-store", redis_server.url, "--state-store-prefix", PREFIX)
    with (
        ServerProcess(repo, *args, "--park-after-s", "0.3") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        admin = admin_grpc.AdminServiceStub(channel)
        stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", session_id="old"))
        shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        admin.LoadModel(admin_pb.LoadModelRequest(model="tiny_lstm", version="2"))
        stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", session_id="new"))
        x = _x(4, 4)
        first = stub.Step(pb.StepRequest(session_id="new", inputs={"x": from_array(x[:2])}))
        redis = redis_server.client()
        wait_until("the new session to park", lambda: redis.exists(KEY + "new"))
        second = stub.Step(pb.StepRequest(session_id="new", inputs={"x": from_array(x[2:])}))
        assert stub.GetSession(pb.GetSessionRequest(session_id="new")).session.version == "2"
        got = np.concatenate([to_array(r.outputs["Y"], "Y") for r in (first, second)])
        want = run_reference(repo, "tiny_lstm", "2", {"x": x})
        np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-6)

        # "old" (version 1) parks; retiring version 1 waits for it as for a resident session.
        wait_until("the old session to park", lambda: redis.exists(KEY + "old"))
        wait_until(  # the store's reply read too, not only the record written
            "the server to know it parked it",
            lambda: server.metric("rnnserve_parked_sessions", model="tiny_lstm", version="1") == 1,
        )
        retired = admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="1"))
        assert (retired.version.state, retired.version.live_sessions) == (admin_pb.RETIRING, 1)
        # The operator moves it off, parked as it is (by its id alone: this server has one
        # identity); version 1 is released, and the session goes on on version 2.
        moved = admin.MoveSession(admin_pb.MoveSessionRequest(session_id="old", version="2"))
        assert (moved.session_id, moved.version, moved.position) == ("old", "2", 0)
        wait_until("version 1 to be released", lambda: _state_of(admin, "1") == admin_pb.RETIRED)
        reply = stub.Step(pb.StepRequest(session_id="old", inputs={"x": from_array(x[:1])}))
        want = run_reference(repo, "tiny_lstm", "2", {"x": x[:1]})
        np.testing.assert_allclose(
            to_array(reply.outputs["Y"], "Y"), want["Y"], rtol=1e-5, atol=1e-6
        )


def _state_of(admin: admin_grpc.AdminServiceStub, version: str) -> int:
    index = admin.RepositoryIndex(admin_pb.RepositoryIndexRequest()).versions
    (found,) = [v for v in index if (v.model, v.version) == ("tiny_lstm", version)]
    return int(found.state)


async def _retiring_engine(
    tmp_path: Path, redis_server: RedisServer, prefix: str
) -> tuple[Engine, Metrics, Path]:
    """An engine in this process parking into the test's Redis, with one session ("s1", of
    "alice") on tiny_lstm:1, which is retiring; its snapshot goes to tmp_path/snap.bin."""
    root = build_test_repository(tmp_path / "repo", {"max_sessions": 8})
    metrics = Metrics()
    snapshot = tmp_path / "snap.bin"
    engine = Engine(
        load_repository(root),
        metrics,
        EngineConfig(snapshot_path=snapshot),
        RedisStateStore(redis_server.url, prefix),
        session_listener(metrics),
    )
    await engine.start()
    await engine.open_session("tiny_lstm", "1", "s1", {}, 0, "alice")
    retiring = await engine.retire_model("tiny_lstm", "1", "ops")
    assert (retiring.state, retiring.live_sessions) == ("RETIRING", 1)
    return engine, metrics, snapshot


async def _version_1(engine: Engine) -> VersionStatus:
    index = await engine.repository_index()
    (found,) = [s for s in index if (s.model, s.version) == ("tiny_lstm", "1")]
    return found


async def _stop(engine: Engine) -> None:
    try:
        await engine.stop()
    finally:
        assert engine.state_store is not None
        await engine.state_store.close()


async def _state_becomes(engine: Engine, state: str) -> None:
    for _ in range(200):
        found = await _version_1(engine)
        if found.state == state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"tiny_lstm:1 never became {state}: {found}")


async def test_parking_the_last_session_of_a_retiring_version_releases_it_after_the_park(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # The version used to be released while the park was still writing the session (its
    # "park" event fired on detach): the park then failed on the freed slabs (KeyError).
    engine, metrics, _ = await _retiring_engine(tmp_path, redis_server, "retire-park:")
    try:
        assert await engine.residency.park_all() == 1
        await _state_becomes(engine, "RETIRED")
        assert redis_server.client().exists("retire-park:alice/s1")
        assert ("alice", "s1") in engine.residency._parked  # noqa: SLF001
        active = metrics.registry.get_sample_value(
            "rnnserve_active_sessions", {"model": "tiny_lstm", "version": "1"}
        )
        assert active in (None, 0.0)  # the park took it off the resident count, once
    finally:
        await _stop(engine)


async def test_a_drain_with_a_retiring_version_hands_off_and_writes_the_snapshot(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    engine, _, snapshot = await _retiring_engine(tmp_path, redis_server, "retire-drain:")
    await _stop(engine)  # used to raise KeyError in the handoff, before the snapshot
    assert snapshot.exists()
    assert redis_server.client().exists("retire-drain:alice/s1")


async def test_a_failed_park_keeps_the_retiring_version_and_its_session(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    engine, metrics, _ = await _retiring_engine(tmp_path, redis_server, "retire-down:")
    store = engine.state_store
    assert store is not None

    async def down(entries: object) -> None:
        await asyncio.sleep(0.05)  # the version's other sessions could leave meanwhile
        raise StoreUnavailable("redis is down (test)")

    try:
        store.put = down  # type: ignore[method-assign]
        assert await engine.residency.park_all() == 0
        del store.put  # the store is back
        await asyncio.sleep(0.1)
        status = await _version_1(engine)
        assert (status.state, status.live_sessions) == ("RETIRING", 1)
        info = await engine.get_session("s1", "alice")
        assert info.version == "1"
        active = metrics.registry.get_sample_value(
            "rnnserve_active_sessions", {"model": "tiny_lstm", "version": "1"}
        )
        assert active == 1.0
    finally:
        vars(store).pop("put", None)
        await _stop(engine)
