"""Parking and model versions: a session on a version loaded while the server runs parks and
comes back onto that version; a parked session whose version was retired and released is
reported when it returns, never moved onto another version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import numpy as np
from deploy.tools import wait_until
from rnnserve.server.frontend.tensors import from_array, to_array
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

        # "old" (version 1) parks; version 1 retires with no resident session and is released.
        wait_until("the old session to park", lambda: redis.exists(KEY + "old"))
        retired = admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="1"))
        assert retired.version.state == admin_pb.RETIRED
        try:
            stub.Step(pb.StepRequest(session_id="old", inputs={"x": from_array(x[:1])}))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "tiny_lstm:1" in (error.details() or "")
        else:
            raise AssertionError("a session of a released version came back on another one")
        assert redis.exists(KEY + "old")  # left in the store, for a server that has it
