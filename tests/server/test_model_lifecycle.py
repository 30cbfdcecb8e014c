"""Model lifecycle against a real server: versions added (LoadModel, polling) and retired
while sessions stream, sessions moved between versions, broken versions, who may do it.

Each test runs its own server over its own copy of the test repository, in which tiny_lstm
starts with version 1 only and its version 2 (same state pairs, other weights) waits aside.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.server.frontend.tensors import from_array, to_array
from rnnserve.testing import HIDDEN, ServerProcess, build_test_repository, cell_model, run_reference
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import reason_of

SESSIONS = 50
TOL = 1e-5


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = build_test_repository(tmp_path / "repo")
    shutil.move(root / "tiny_lstm" / "2", tmp_path / "spare-2")
    return root


def _drop_in(source: Path, target: Path) -> None:
    """Put a version folder in place at once (a rename), as an operator's deploy should."""
    staging = target.parent / f".staging-{target.name}"
    shutil.copytree(source, staging)
    staging.rename(target)


def _x(seed: int, timesteps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


def _index(address: str, metadata: tuple = ()) -> dict[tuple[str, str], admin_pb.VersionStatus]:
    with grpc.insecure_channel(address) as channel:
        reply = admin_grpc.AdminServiceStub(channel).RepositoryIndex(
            admin_pb.RepositoryIndexRequest(), metadata=metadata
        )
    return {(v.model, v.version): v for v in reply.versions}


def _health_becomes(channel: grpc.Channel, service: str, status: int) -> None:
    """Per-model and per-version health follow the catalogue (within moments)."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 10
    while True:
        got = stub.Check(health_pb2.HealthCheckRequest(service=service)).status
        if got == status:
            return
        assert time.monotonic() < deadline, f"{service} health stays {got}, not {status}"
        time.sleep(0.05)


def _wait_for_state(address: str, model: str, version: str, state: int) -> admin_pb.VersionStatus:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = _index(address).get((model, version))
        if found is not None and found.state == state:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{model}:{version} never reached {admin_pb.VersionState.Name(state)}")


class Streamer:
    """Many sessions stepped one timestep per round over one StreamSteps call, until told to
    stop; every result is kept, and any error fails the test."""

    def __init__(self, address: str, ids: list[str], timesteps: int) -> None:
        self.address = address
        self.ids = ids
        self.inputs = {sid: _x(n, timesteps) for n, sid in enumerate(ids)}
        self.outputs: dict[str, list[np.ndarray]] = {sid: [] for sid in ids}
        self.stop = asyncio.Event()
        self.rounds = 0

    async def run(self, min_rounds_after_stop: int = 3) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).StreamSteps()
            after_stop = 0
            while after_stop < min_rounds_after_stop:
                if self.stop.is_set():
                    after_stop += 1
                t = self.rounds
                steps = [
                    pb.StepRequest(
                        session_id=sid,
                        request_id=f"{sid}:{t}",
                        inputs={"x": from_array(self.inputs[sid][t : t + 1])},
                    )
                    for sid in self.ids
                ]
                await call.write(pb.StreamStepsRequest(steps=steps))
                answered = 0
                while answered < len(self.ids):
                    message = await call.read()
                    assert message is not grpc.aio.EOF
                    for result in message.results:
                        assert result.WhichOneof("outcome") == "response", result.error
                        assert result.response.position == t + 1
                        y = to_array(result.response.outputs["Y"], "Y")
                        self.outputs[result.session_id].append(y)
                        answered += 1
                self.rounds += 1
                await asyncio.sleep(0.01)
            await call.done_writing()

    def check(self, repository: Path, version: str) -> None:
        """Every session's outputs equal one whole run of its inputs on ``version``."""
        for sid, chunks in self.outputs.items():
            x = self.inputs[sid][: len(chunks)]
            want = run_reference(repository, "tiny_lstm", version, {"x": x})
            np.testing.assert_allclose(np.concatenate(chunks), want["Y"], rtol=TOL, atol=TOL)


async def _open_many(address: str, count: int, version: str = "") -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(
                stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", version=version))
                for _ in range(count)
            )
        )
    assert {r.session.version for r in replies} == {version or "1"}
    return [r.session.session_id for r in replies]


def _new_session_lands_on(address: str, repository: Path, version: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        opened = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")).session
        assert opened.version == version
        x = _x(99, 3)
        reply = stub.Step(pb.StepRequest(session_id=opened.session_id, inputs={"x": from_array(x)}))
        want = run_reference(repository, "tiny_lstm", version, {"x": x})
        np.testing.assert_allclose(to_array(reply.outputs["Y"], "Y"), want["Y"], rtol=TOL, atol=TOL)
        model = stub.GetModel(pb.GetModelRequest(name="tiny_lstm")).model
        assert model.version == version


@pytest.mark.parametrize("how", ["LoadModel", "poll"])
async def test_version_2_joins_while_50_sessions_stream_on_version_1_untouched(
    repo: Path, tmp_path: Path, how: str
) -> None:
    extra = ("--poll-repository-s", "0.2") if how == "poll" else ()
    with ServerProcess(repo, *extra) as server:
        ids = await _open_many(server.address, SESSIONS)
        streamer = Streamer(server.address, ids, timesteps=400)
        streaming = asyncio.create_task(streamer.run())
        while streamer.rounds < 3:
            await asyncio.sleep(0.01)
        _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        if how == "LoadModel":
            async with grpc.aio.insecure_channel(server.address) as channel:
                reply = await admin_grpc.AdminServiceStub(channel).LoadModel(
                    admin_pb.LoadModelRequest(model="tiny_lstm", version="2")
                )
            assert [(v.version, v.state) for v in reply.versions] == [("2", admin_pb.READY)]
        else:
            await asyncio.to_thread(
                _wait_for_state, server.address, "tiny_lstm", "2", admin_pb.READY
            )
        streamer.stop.set()
        await streaming
        streamer.check(repo, "1")  # no error, no changed output, still on version 1
        _new_session_lands_on(server.address, repo, "2")
        index = _index(server.address)
        assert index[("tiny_lstm", "1")].live_sessions == SESSIONS
        assert index[("tiny_lstm", "2")].state == admin_pb.READY
        assert index[("tiny_lstm", "2")].live_sessions == 1


def test_retired_version_refuses_opens_serves_its_sessions_then_leaves(
    repo: Path, tmp_path: Path
) -> None:
    _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
    with ServerProcess(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        admin = admin_grpc.AdminServiceStub(channel)
        ids = [
            stub.OpenSession(
                pb.OpenSessionRequest(model="tiny_lstm", version="1")
            ).session.session_id
            for _ in range(2)
        ]
        x = _x(5, 4)
        for sid in ids:
            stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[:2])}))
        retired = admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="1"))
        assert retired.version.state == admin_pb.RETIRING
        assert retired.version.live_sessions == 2
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        _health_becomes(channel, "tiny_lstm:1", not_serving)
        _health_becomes(channel, "tiny_lstm:2", serving)
        _health_becomes(channel, "tiny_lstm", serving)

        with pytest.raises(grpc.RpcError) as refused:
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", version="1"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(refused.value) == "VERSION_RETIRING"
        assert "retiring" in refused.value.details()
        assert stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")).session.version == "2"

        want = run_reference(repo, "tiny_lstm", "1", {"x": x})
        for sid in ids:  # live sessions go on, exactly
            reply = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[2:])}))
            np.testing.assert_allclose(
                to_array(reply.outputs["Y"], "Y"), want["Y"][2:], rtol=TOL, atol=TOL
            )
        stub.CloseSession(pb.CloseSessionRequest(session_id=ids[0]))
        assert _index(server.address)[("tiny_lstm", "1")].state == admin_pb.RETIRING
        stub.CloseSession(pb.CloseSessionRequest(session_id=ids[1]))
        gone = _wait_for_state(server.address, "tiny_lstm", "1", admin_pb.RETIRED)
        assert (gone.on_disk, gone.live_sessions) == (True, 0)
        _health_becomes(channel, "tiny_lstm:1", health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetModel(pb.GetModelRequest(name="tiny_lstm", version="1"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        info = server.metric("rnnserve_model_info", model="tiny_lstm", version="1")
        assert info == 0  # its series is gone with it
        # A retired version stays retired under polling; LoadModel brings it back.
        back = admin.LoadModel(admin_pb.LoadModelRequest(model="tiny_lstm", version="1"))
        assert back.versions[0].state == admin_pb.READY


def test_move_session_continues_exactly_or_refuses_incompatible_state(
    repo: Path, tmp_path: Path
) -> None:
    _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
    with ServerProcess(repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        admin = admin_grpc.AdminServiceStub(channel)
        sid = stub.OpenSession(
            pb.OpenSessionRequest(model="tiny_lstm", version="1")
        ).session.session_id
        x = _x(7, 5)
        stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[:3])}))
        exported = stub.ExportState(pb.ExportStateRequest(session_id=sid)).state

        moved = admin.MoveSession(admin_pb.MoveSessionRequest(session_id=sid, version="2"))
        assert (moved.version, moved.position) == ("2", 3)
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.version == "2"
        after = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[3:])}))

        twin = stub.OpenSession(
            pb.OpenSessionRequest(model="tiny_lstm", version="2", initial_state=exported)
        ).session.session_id
        same = stub.Step(pb.StepRequest(session_id=twin, inputs={"x": from_array(x[3:])}))
        np.testing.assert_array_equal(
            to_array(after.outputs["Y"], "Y"), to_array(same.outputs["Y"], "Y")
        )

        # Version 3 of tiny_lstm comes with a config whose state is wider: not movable.
        config = repo / "tiny_lstm" / "config.toml"
        hidden = HIDDEN["tiny_lstm"]
        config.write_text(config.read_text().replace(f", {hidden}]", f", {hidden + 2}]"))
        (repo / "tiny_lstm" / "3").mkdir()
        (repo / "tiny_lstm" / "3" / "model.onnx").write_bytes(cell_model("LSTM", hidden + 2, 5, {}))
        loaded = admin.LoadModel(admin_pb.LoadModelRequest(model="tiny_lstm", version="3"))
        assert loaded.versions[0].state == admin_pb.READY, loaded.versions[0].reason
        with pytest.raises(grpc.RpcError) as refused:
            admin.MoveSession(admin_pb.MoveSessionRequest(session_id=sid, version="3"))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert reason_of(refused.value) == "STATE_INCOMPATIBLE"
        assert "[1, 8]" in refused.value.details() and "[1, 10]" in refused.value.details()
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.version == "2"


def test_a_broken_folder_in_a_polled_repository_fails_and_serving_goes_on(repo: Path) -> None:
    with ServerProcess(repo, "--poll-repository-s", "0.2") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru")).session.session_id
            x = _x(3, 4)
            first = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[:2])}))
            (repo / "tiny_gru" / "2").mkdir()
            (repo / "tiny_gru" / "2" / "model.onnx").write_bytes(b"\x08garbage")
            failed = _wait_for_state(server.address, "tiny_gru", "2", admin_pb.FAILED)
            assert "tiny_gru/2/model.onnx" in failed.reason
            assert "cannot load the model" in failed.reason
            second = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[2:])}))
            want = run_reference(repo, "tiny_gru", "1", {"x": x})
            got = np.concatenate([to_array(r.outputs["Y"], "Y") for r in (first, second)])
            np.testing.assert_allclose(got, want["Y"], rtol=TOL, atol=TOL)
            opened = stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru")).session
            assert opened.version == "1"
            # A new model dropped in is picked up too.
            shutil.copytree(repo / "tiny_rnn", repo / ".staging")
            (repo / ".staging").rename(repo / "tiny_rnn_copy")
            _wait_for_state(server.address, "tiny_rnn_copy", "1", admin_pb.READY)
            names = {m.name for m in stub.ListModels(pb.ListModelsRequest()).models}
            assert "tiny_rnn_copy" in names
        assert "event=version_failed model=tiny_gru version=2" in server.stderr()


def test_a_version_being_staged_or_written_with_leading_zeros_is_served_like_any_other(
    repo: Path, tmp_path: Path
) -> None:
    # A restart during a rollout (a ".staging-3" folder half copied) used to refuse to start,
    # and a folder "02" loaded at startup but failed to load at run time ("missing model.onnx").
    shutil.copytree(repo / "tiny_lstm", tmp_path / "spare-repo" / "tiny_lstm")  # the reference
    shutil.copytree(tmp_path / "spare-2", tmp_path / "spare-repo" / "tiny_lstm" / "2")
    shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / ".staging-3")
    (repo / "tiny_lstm" / ".staging-3" / "model.onnx").unlink()  # the copy is under way
    with ServerProcess(repo) as server:
        assert set(_index(server.address)) >= {("tiny_lstm", "1")}
        assert ("tiny_lstm", "3") not in _index(server.address)
        _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "02")
        with grpc.insecure_channel(server.address) as channel:
            admin = admin_grpc.AdminServiceStub(channel)
            (loaded,) = admin.LoadModel(
                admin_pb.LoadModelRequest(model="tiny_lstm", version="2")
            ).versions
            assert loaded.state == admin_pb.READY, loaded.reason
            stub = pb_grpc.InferenceServiceStub(channel)
            opened = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", version="2"))
            x = _x(5, 3)
            reply = stub.Step(
                pb.StepRequest(session_id=opened.session.session_id, inputs={"x": from_array(x)})
            )
            # Every call that names the version, spelt as its folder is, means version 2
            # (LoadModel took "02" for "2"; the others answered NOT_FOUND).
            described = stub.GetModel(pb.GetModelRequest(name="tiny_lstm", version="02"))
            assert described.model.version == "2"
            zeros = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", version="02"))
            assert zeros.session.version == "2"
            predicted = stub.Predict(
                pb.PredictRequest(model="tiny_lstm", version="02", inputs={"x": from_array(x)})
            )
            retired = admin.RetireModel(
                admin_pb.RetireModelRequest(model="tiny_lstm", version="02")
            ).version
            assert (retired.version, retired.state) == ("2", admin_pb.RETIRING)
        want = run_reference(tmp_path / "spare-repo", "tiny_lstm", "2", {"x": x})
        np.testing.assert_allclose(to_array(reply.outputs["Y"], "Y"), want["Y"], rtol=TOL, atol=TOL)
        got = to_array(predicted.outputs["Y"], "Y")
        np.testing.assert_allclose(got, want["Y"], rtol=TOL, atol=TOL)


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text("ops:ops-token-0123456789\nalice:alice-token-0123456789\n")
    return path


def test_admin_calls_need_an_admin_identity_when_auth_is_on(repo: Path, tokens: Path) -> None:
    with (
        ServerProcess(repo, "--token-file", str(tokens), "--admin-identity", "ops") as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        admin = admin_grpc.AdminServiceStub(channel)
        alice = (("authorization", "Bearer alice-token-0123456789"),)
        ops = (("authorization", "Bearer ops-token-0123456789"),)
        calls = [
            lambda md: admin.RepositoryIndex(admin_pb.RepositoryIndexRequest(), metadata=md),
            lambda md: admin.LoadModel(admin_pb.LoadModelRequest(model="tiny_lstm"), metadata=md),
            lambda md: admin.RetireModel(
                admin_pb.RetireModelRequest(model="tiny_rnn", version="1"), metadata=md
            ),
            lambda md: admin.MoveSession(
                admin_pb.MoveSessionRequest(session_id="x", version="1"), metadata=md
            ),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as denied:
                call(alice)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason_of(denied.value) == "ADMIN_REQUIRED"
            with pytest.raises(grpc.RpcError) as anonymous:
                call(())
            assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        index = _index(server.address, ops)
        assert index[("tiny_rnn", "1")].state == admin_pb.READY


@pytest.mark.parametrize("source", ["--token-file", "RNNSERVE_TOKENS"])
def test_an_admin_identity_without_a_token_refuses_to_start(
    repo: Path, tokens: Path, source: str
) -> None:
    """A misspelt admin would leave the AdminService reachable by nobody, found only when
    the first load is refused; the server says so at start instead, naming flag and file."""
    if source == "--token-file":
        args, env, where = ("--token-file", str(tokens)), None, str(tokens)
    else:
        args, env, where = (), {"RNNSERVE_TOKENS": tokens.read_text()}, "RNNSERVE_TOKENS"
    server = ServerProcess(
        repo, *args, "--admin-identity", "ops", "--admin-identity", "opps", env=env
    )
    try:
        with pytest.raises(RuntimeError) as refused:
            server.start()
    finally:
        server.stop()
    message = str(refused.value)
    assert "server exited with 2" in message, message
    assert "--admin-identity 'opps'" in message and where in message, message
    assert "--admin-identity 'ops'" not in message, message  # a listed one is fine


def test_an_admin_identity_without_authentication_is_logged_as_restricting_nothing(
    repo: Path,
) -> None:
    with ServerProcess(repo, "--admin-identity", "ops") as server:
        assert _index(server.address)[("tiny_rnn", "1")].state == admin_pb.READY  # open to all
        log = server.stderr()
    assert "event=admin_identity_unused" in log and "restricts nothing" in log, log[-2000:]


def test_two_frontends_load_a_version_and_both_see_it(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo, "--frontends", "2") as server:
        _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        before = _index(server.address)[("tiny_lstm", "2")]
        assert (before.state, before.on_disk) == (admin_pb.AVAILABLE, True)
        with grpc.insecure_channel(server.address) as channel:
            reply = admin_grpc.AdminServiceStub(channel).LoadModel(
                admin_pb.LoadModelRequest(model="tiny_lstm")
            )
        assert [(v.version, v.state) for v in reply.versions] == [("2", admin_pb.READY)]
        # Fresh connections reach either frontend: every one describes and serves version 2.
        for _ in range(8):
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                model = stub.GetModel(pb.GetModelRequest(name="tiny_lstm")).model
                assert (model.version, list(model.versions)) == ("2", ["1", "2"])
        _new_session_lands_on(server.address, repo, "2")
        assert _index(server.address)[("tiny_lstm", "2")].state == admin_pb.READY
        for _ in range(4):
            with grpc.insecure_channel(server.address) as channel:
                _health_becomes(channel, "tiny_lstm:2", health_pb2.HealthCheckResponse.SERVING)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "rnnserve.server", "models", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_the_cli_loads_indexes_and_retires(repo: Path, tmp_path: Path) -> None:
    with ServerProcess(repo) as server:
        _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        index = _cli("index", "--server", server.address)
        assert index.returncode == 0, index.stderr
        assert "tiny_lstm 2 AVAILABLE on_disk=true sessions=0" in index.stdout
        loaded = _cli("load", "tiny_lstm", "--version", "2", "--server", server.address)
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.strip() == "tiny_lstm 2 READY on_disk=true sessions=0"
        retired = _cli("retire", "tiny_lstm", "--version", "1", "--server", server.address)
        assert retired.returncode == 0, retired.stderr
        assert "tiny_lstm 1 RETIRED on_disk=true sessions=0 retired by anonymous" in retired.stdout
        missing = _cli("load", "no_such_model", "--server", server.address)
        assert missing.returncode == 1
        assert "NOT_FOUND" in missing.stderr
        (repo / "tiny_gru" / "2").mkdir()
        (repo / "tiny_gru" / "2" / "model.onnx").write_bytes(b"broken")
        failed = _cli("load", "tiny_gru", "--server", server.address, "--json")
        assert failed.returncode == 1
        assert '"state": "FAILED"' in failed.stdout


def test_snapshots_restore_onto_the_recorded_version_and_report_one_that_is_gone(
    repo: Path, tmp_path: Path
) -> None:
    snapshot = tmp_path / "sessions.snap"
    log = tmp_path / "server.log"
    x = _x(11, 4)
    with ServerProcess(repo, "--snapshot", str(snapshot), log_path=log) as server:
        _drop_in(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        with grpc.insecure_channel(server.address) as channel:
            admin_grpc.AdminServiceStub(channel).LoadModel(
                admin_pb.LoadModelRequest(model="tiny_lstm", version="2")
            )
            stub = pb_grpc.InferenceServiceStub(channel)
            for sid, version in (("on-1", "1"), ("on-2", "2")):
                stub.OpenSession(
                    pb.OpenSessionRequest(model="tiny_lstm", version=version, session_id=sid)
                )
                stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[:2])}))
    # Restarted with both versions on disk: each session comes back on its own version.
    with ServerProcess(repo, "--snapshot", str(snapshot), log_path=log) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for sid, version in (("on-1", "1"), ("on-2", "2")):
                assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.version == (
                    version
                )
                reply = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x[2:])}))
                want = run_reference(repo, "tiny_lstm", version, {"x": x})
                np.testing.assert_allclose(
                    to_array(reply.outputs["Y"], "Y"), want["Y"][2:], rtol=TOL, atol=TOL
                )
    # Restarted without version 2: its session is reported, not moved onto version 1.
    shutil.rmtree(repo / "tiny_lstm" / "2")
    with ServerProcess(repo, "--snapshot", str(snapshot), log_path=log) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            assert stub.GetSession(pb.GetSessionRequest(session_id="on-1")).session.version == "1"
            with pytest.raises(grpc.RpcError) as gone:
                stub.GetSession(pb.GetSessionRequest(session_id="on-2"))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model tiny_lstm version 2 is not loaded" in log.read_text()


def test_retiring_a_version_answers_its_predicts_in_flight(tmp_path: Path) -> None:
    # With several frontends, Predicts queued on the version's onnxruntime thread used to be
    # cancelled when it was released, and their callers waited for their deadline. Long
    # sequences, so that several are queued there when RetireModel comes.
    repo = build_test_repository(tmp_path / "repo", {"max_timesteps": 32768})
    x = from_array(_x(0, 32768))
    request = pb.PredictRequest(model="tiny_lstm", version="1", inputs={"x": x})

    async def calls(address: str) -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            admin = admin_grpc.AdminServiceStub(channel)
            running = [asyncio.ensure_future(stub.Predict(request, timeout=30)) for _ in range(32)]
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            await admin.RetireModel(admin_pb.RetireModelRequest(model="tiny_lstm", version="1"))
            codes = []
            for call in running:
                try:
                    await call
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
            return codes

    with ServerProcess(repo, "--frontends", "2") as server:
        started = time.monotonic()
        codes = asyncio.run(calls(server.address))
        assert time.monotonic() - started < 25, "calls waited for their deadline"
        # Each is answered: run (it was on its way), or refused (retiring, then released).
        allowed = {
            grpc.StatusCode.OK,
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.NOT_FOUND,
        }
        assert set(codes) <= allowed, codes
        assert grpc.StatusCode.OK in codes
        _wait_for_state(server.address, "tiny_lstm", "1", admin_pb.RETIRED)


def test_a_version_whose_requests_exceed_the_receive_limit_fails_to_load(
    repo: Path, tmp_path: Path
) -> None:
    # The receive limit is sized at start; a model loaded later whose valid requests are
    # larger used to load READY and then refuse those requests (RESOURCE_EXHAUSTED).
    spare = tmp_path / "spare-rnn"
    shutil.move(repo / "tiny_rnn", spare)
    config = spare / "config.toml"
    config.write_text(
        config.read_text().replace("[limits]\n", "[limits]\nmax_timesteps = 400000\n")
    )
    load = admin_pb.LoadModelRequest(model="tiny_rnn")
    with ServerProcess(repo) as server:
        shutil.copytree(spare, repo / "tiny_rnn")
        with grpc.insecure_channel(server.address) as channel:
            (failed,) = admin_grpc.AdminServiceStub(channel).LoadModel(load).versions
        assert failed.state == admin_pb.FAILED
        assert "--max-message-bytes" in failed.reason and "tiny_rnn/config.toml" in failed.reason
        assert _index(server.address)[("tiny_rnn", "1")].state == admin_pb.FAILED
    shutil.rmtree(repo / "tiny_rnn")
    # Given the room, the same load works and its largest requests are taken.
    with ServerProcess(repo, "--max-message-bytes", str(16 << 20)) as server:
        shutil.copytree(spare, repo / "tiny_rnn")
        big = ((f"grpc.max_{way}_message_length", 16 << 20) for way in ("send", "receive"))
        with grpc.insecure_channel(server.address, options=list(big)) as channel:
            (ready,) = admin_grpc.AdminServiceStub(channel).LoadModel(load).versions
            assert ready.state == admin_pb.READY, ready.reason
            x = np.zeros((300_000, 4), np.float32)
            reply = pb_grpc.InferenceServiceStub(channel).Predict(
                pb.PredictRequest(model="tiny_rnn", inputs={"x": from_array(x)}), timeout=60
            )
        assert to_array(reply.outputs["Y"], "Y").shape[0] == 300_000
