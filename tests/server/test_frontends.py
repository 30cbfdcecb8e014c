"""Several frontend processes in front of one engine (``--frontends 2``), and what every
frontend owes its clients whatever their number: health under the service's full name,
recovery metadata in errors, sessions released when their stream ends if asked.

With several frontends the engine is the only owner of sessions, so any frontend serves any
session: each test below opens sessions on some connections and steps them on others (the
kernel spreads connections over the frontends that share the port).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, run_reference
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

from .helpers import assert_close, metric, outputs_of

CONNECTIONS = 6


@pytest.fixture(scope="module")
def two_frontends(test_repository: Path):  # noqa: ANN201
    with ServerProcess(test_repository, "--frontends", "2") as process:
        yield process


@pytest.fixture(params=["1 frontend", "2 frontends"])
async def each_channel(request: pytest.FixtureRequest):  # noqa: ANN201
    """A channel to the shared server (one frontend) and to the module's two-frontend one."""
    server = request.getfixturevalue("server" if request.param == "1 frontend" else "two_frontends")
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


def _frontend_processes(pid: int) -> list[int]:
    """The server's child processes started as frontends (multiprocessing spawn children)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    found = []
    for child in (int(line) for line in out.stdout.split()):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(child)
    return found


def test_the_engine_runs_with_two_frontend_processes(two_frontends: ServerProcess) -> None:
    assert two_frontends.process is not None
    assert len(_frontend_processes(two_frontends.process.pid)) == 2


async def test_any_frontend_serves_any_session(two_frontends: ServerProcess) -> None:
    channels = [grpc.aio.insecure_channel(two_frontends.address) for _ in range(CONNECTIONS)]
    try:
        stubs = [pb_grpc.InferenceServiceStub(c) for c in channels]
        sessions = []
        for n in range(12):
            opened = await stubs[n % CONNECTIONS].OpenSession(
                pb.OpenSessionRequest(model="tiny_lstm")
            )
            x = np.random.default_rng(n).standard_normal((5, 4)).astype(np.float32)
            sessions.append((opened.session.session_id, x))

        async def drive(n: int, sid: str, x: np.ndarray) -> list[dict[str, np.ndarray]]:
            got = []
            for t in range(len(x)):
                stub = stubs[(n + t + 1) % CONNECTIONS]  # never the connection it opened on
                reply = await stub.Step(
                    pb.StepRequest(session_id=sid, inputs={"x": from_array(x[t : t + 1])})
                )
                assert reply.position == t + 1
                got.append(outputs_of(reply))
            return got

        results = await asyncio.gather(*(drive(n, sid, x) for n, (sid, x) in enumerate(sessions)))
        for (_sid, x), got in zip(sessions, results, strict=True):
            want = run_reference(two_frontends.repository, "tiny_lstm", "", {"x": x})
            assert_close({"Y": np.concatenate([g["Y"] for g in got])}, {"Y": want["Y"]})
    finally:
        for channel in channels:
            await channel.close()


async def test_streams_on_several_frontends_keep_each_sessions_order(
    two_frontends: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(two_frontends.address) as opener:
        stub = pb_grpc.InferenceServiceStub(opener)
        ids = [
            (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru"))).session.session_id
            for _ in range(8)
        ]

    async def stream(ids: list[str]) -> dict[str, list[int]]:
        async with grpc.aio.insecure_channel(two_frontends.address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).StreamSteps()
            for t in range(6):
                steps = [
                    pb.StepRequest(
                        session_id=sid,
                        request_id=f"{sid}:{t}",
                        inputs={"x": from_array(np.full((1, 4), t, np.float32))},
                    )
                    for sid in ids
                ]
                await call.write(pb.StreamStepsRequest(steps=steps))
            await call.done_writing()
            positions: dict[str, list[int]] = {sid: [] for sid in ids}
            async for message in call:
                for result in message.results:
                    assert result.WhichOneof("outcome") == "response", result.error
                    positions[result.session_id].append(result.response.position)
            return positions

    halves = await asyncio.gather(stream(ids[:4]), stream(ids[4:]))
    for positions in halves:
        assert all(p == [1, 2, 3, 4, 5, 6] for p in positions.values())


def test_metrics_of_every_frontend_reach_one_endpoint(two_frontends: ServerProcess) -> None:
    ok_steps = metric(two_frontends.metrics_port, "rnnserve_requests_total")
    steps = sum(v for k, v in ok_steps.items() if 'code="OK"' in k and "Step" in k)
    assert steps > 0
    batches = metric(two_frontends.metrics_port, "rnnserve_batch_size_count")
    assert sum(batches.values()) > 0


def test_two_frontends_stop_cleanly_on_sigterm(test_repository: Path) -> None:
    with ServerProcess(test_repository, "--frontends", "2") as process:
        assert process.process is not None
        children = _frontend_processes(process.process.pid)
        assert len(children) == 2
        process.signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def test_frontends_start_under_a_temporary_folder_too_deep_for_a_socket(
    test_repository: Path, tmp_path: Path
) -> None:
    # A unix socket's path holds at most 103 bytes everywhere; CI runners and sandboxes often
    # set a TMPDIR deeper than that. The engine's socket then goes under /tmp instead.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with ServerProcess(test_repository, "--frontends", "2", env={"TMPDIR": str(deep)}) as process:
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")).session.session_id
            x = np.ones((1, 4), np.float32)
            reply = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x)}))
            assert reply.position == 1
        process.signal(signal.SIGTERM)
        assert process.wait(30) == 0
    assert not list(deep.glob("rnnserve-engine-*"))


# -- what every frontend answers, whatever their number ----------------------------------------
async def test_health_answers_the_service_full_name(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "rnnserve.v1.InferenceService", "tiny_lstm"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


async def test_position_mismatch_says_where_the_session_is(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    sid = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))).session.session_id
    x = {"x": from_array(np.zeros((3, 4), np.float32))}
    await stub.Step(pb.StepRequest(session_id=sid, inputs=x))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Step(pb.StepRequest(session_id=sid, inputs=x, expected_position=1))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    error_info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error_info)
    assert error_info.reason == "POSITION_MISMATCH"
    assert error_info.metadata["position"] == "3"
    assert error_info.metadata["expected_position"] == "1"
    # On a stream the step's own error says the same, and the stream goes on.
    call = stub.StreamSteps()
    await call.write(
        pb.StreamStepsRequest(
            steps=[pb.StepRequest(session_id=sid, inputs=x, expected_position=1, request_id="a")]
        )
    )
    (result,) = (await call.read()).results
    assert result.error.reason == "POSITION_MISMATCH"
    assert dict(result.error.metadata) == {
        "session_id": sid,
        "position": "3",
        "expected_position": "1",
    }
    await call.write(pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=sid, inputs=x)]))
    assert (await call.read()).results[0].response.position == 6
    await call.done_writing()


@pytest.mark.parametrize("release", ["on the first message", "on a later message", "never"])
async def test_a_stream_can_close_its_sessions_when_it_ends(
    each_channel: grpc.aio.Channel, release: str
) -> None:
    stub = pb_grpc.InferenceServiceStub(each_channel)
    ids = [
        (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))).session.session_id
        for _ in range(3)
    ]
    call = stub.StreamSteps()
    steps = [
        pb.StepRequest(session_id=sid, inputs={"x": from_array(np.zeros((1, 4), np.float32))})
        for sid in ids
    ]
    # The flag on any message closes every session the stream stepped, earlier ones too.
    first = release == "on the first message"
    await call.write(pb.StreamStepsRequest(steps=steps[:2], close_sessions_on_end=first))
    later = release == "on a later message"
    await call.write(pb.StreamStepsRequest(steps=steps[2:], close_sessions_on_end=later))
    answered = 0
    while answered < len(ids):
        answered += len((await call.read()).results)
    call.cancel()  # the client vanishes mid-stream
    closing = release != "never"
    for _ in range(100):
        states = []
        for sid in ids:
            try:
                await stub.GetSession(pb.GetSessionRequest(session_id=sid))
                states.append("open")
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                states.append(dict(error.trailing_metadata())["rnnserve-error-reason"])
        if not closing or states == ["SESSION_CLOSED"] * len(ids):
            break
        await asyncio.sleep(0.05)
    assert states == (["SESSION_CLOSED"] * len(ids) if closing else ["open"] * len(ids))


def test_a_frontend_that_dies_is_replaced_and_sessions_go_on(test_repository: Path) -> None:
    import time

    with ServerProcess(test_repository, "--frontends", "2") as process:
        assert process.process is not None
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn")).session.session_id
        before = _frontend_processes(process.process.pid)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _frontend_processes(process.process.pid)
            if len(now) == 2 and before[0] not in now:
                break
            time.sleep(0.1)
        assert len(now) == 2 and before[0] not in now
        with grpc.insecure_channel(process.address) as channel:  # a new connection
            stub = pb_grpc.InferenceServiceStub(channel)
            x = {"x": from_array(np.zeros((1, 4), np.float32))}
            for expected in (1, 2):
                assert stub.Step(pb.StepRequest(session_id=sid, inputs=x)).position == expected
        assert "event=frontend_exited" in process.stderr()


async def test_steps_in_flight_when_the_engine_dies_fail_unavailable_at_once(
    test_repository: Path,
) -> None:
    # They used to wait for the frontend's drain to run out (--grace) and end "cancelled".
    with ServerProcess(test_repository, "--frontends", "2", "--grace", "60") as process:
        assert process.process is not None
        engine = process.process.pid
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            opened = await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))
            request = pb.StepRequest(
                session_id=opened.session.session_id,
                inputs={"x": from_array(np.zeros((1, 4), np.float32))},
            )
            assert (await stub.Step(request)).position == 1
            os.kill(engine, signal.SIGSTOP)  # the engine takes the steps in and never answers
            unary = asyncio.ensure_future(stub.Step(request, timeout=30))
            stream = stub.StreamSteps(timeout=30)
            await stream.write(pb.StreamStepsRequest(steps=[request]))
            await asyncio.sleep(0.5)
            os.kill(engine, signal.SIGKILL)
            os.kill(engine, signal.SIGCONT)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await unary
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the engine is gone" in (failed.value.details() or "")
            (result,) = (await stream.read()).results  # the step's own error, on the stream
            assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "the engine is gone" in result.error.message
        process.process.wait(10)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_second_server_on_a_port_in_use_is_refused(
    two_frontends: ServerProcess, test_repository: Path, frontends: str
) -> None:
    # With SO_REUSEPORT always on, it used to start and take half the new connections, to a
    # session store of its own (half the sessions "not found").
    import sys

    port = two_frontends.address.rpartition(":")[2]
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.server", "serve", "--repository",
            str(test_repository), "--port", port, "--metrics-port", "-1",
            "--frontends", frontends,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_frontends_stop_when_the_engine_process_is_killed(test_repository: Path) -> None:
    import time

    with ServerProcess(test_repository, "--frontends", "2") as process:
        assert process.process is not None
        children = _frontend_processes(process.process.pid)
        process.process.kill()
        process.process.wait(10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in children):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}").exists() for p in children)


async def test_steps_of_a_cancelled_stream_that_have_not_run_are_dropped(
    two_frontends: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(two_frontends.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm"))).session.session_id
        call = stub.StreamSteps()
        x = {"x": from_array(np.zeros((1, 4), np.float32))}
        steps = [pb.StepRequest(session_id=sid, request_id=str(n), inputs=x) for n in range(200)]
        await call.write(pb.StreamStepsRequest(steps=steps))
        await call.read()  # some have run
        call.cancel()
        positions = []
        for _ in range(40):  # until the position stops moving (at most one more step runs)
            await asyncio.sleep(0.25)
            reply = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            positions.append(reply.session.position)
            if len(positions) >= 3 and positions[-1] == positions[-2] == positions[-3]:
                break
        assert 1 <= positions[-1] == positions[-3] < 200


# -- a frontend process that dies mid-stream ---------------------------------------------------
@pytest.fixture(scope="module")
def frontends_to_kill(test_repository: Path):  # noqa: ANN201
    """A server of its own whose frontend processes the tests kill (they are replaced)."""
    with ServerProcess(test_repository, "--frontends", "2") as process:
        yield process


async def _replace_every_frontend(process: ServerProcess) -> None:
    """SIGKILL every frontend process, as a crash or the OOM killer would; return once the
    server has started new ones."""
    assert process.process is not None
    before = _frontend_processes(process.process.pid)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    for _ in range(300):
        now = _frontend_processes(process.process.pid)
        if len(now) == len(before) and not set(now) & set(before):
            break
        await asyncio.sleep(0.1)
    assert len(now) == len(before) and not set(now) & set(before)
    for _ in range(100):  # until they serve
        try:
            async with grpc.aio.insecure_channel(process.address) as channel:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)


async def _settled_position(stub: pb_grpc.InferenceServiceStub, sid: str) -> int:
    """The session's position once it has stopped moving."""
    positions: list[int] = []
    for _ in range(40):
        reply = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
        positions.append(reply.session.position)
        if len(positions) >= 3 and positions[-1] == positions[-2] == positions[-3]:
            break
        await asyncio.sleep(0.25)
    return positions[-1]


async def test_steps_of_a_frontend_that_dies_that_have_not_run_are_dropped(
    frontends_to_kill: ServerProcess,
) -> None:
    # The stream's client is gone with its frontend, as if it had cancelled: its steps still
    # queued in the engine are not applied (they used to run, all of them, on the session).
    steps, timesteps = 1000, 8
    async with grpc.aio.insecure_channel(frontends_to_kill.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm"))).session.session_id
        call = stub.StreamSteps()
        x = {"x": from_array(np.zeros((timesteps, 4), np.float32))}
        await call.write(
            pb.StreamStepsRequest(
                steps=[
                    pb.StepRequest(session_id=sid, request_id=str(n), inputs=x)
                    for n in range(steps)
                ]
            )
        )
        await call.read()  # every step is in the engine, and some have run
        await _replace_every_frontend(frontends_to_kill)
    async with grpc.aio.insecure_channel(frontends_to_kill.address) as channel:
        position = await _settled_position(pb_grpc.InferenceServiceStub(channel), sid)
    assert timesteps <= position < steps * timesteps


async def test_a_stream_whose_frontend_dies_closes_its_sessions_if_it_asked(
    frontends_to_kill: ServerProcess,
) -> None:
    # close_sessions_on_end: the stream ends when its frontend dies too (its client saw it
    # end); the sessions used to stay open until their idle timeout.
    async with grpc.aio.insecure_channel(frontends_to_kill.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        ids = [
            (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))).session.session_id
            for _ in range(3)
        ]
        kept = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"))).session.session_id
        x = {"x": from_array(np.zeros((1, 4), np.float32))}
        releasing = stub.StreamSteps()
        await releasing.write(
            pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=ids[0], inputs=x)])
        )
        await releasing.write(  # the flag on a later message: the earlier session too
            pb.StreamStepsRequest(
                steps=[pb.StepRequest(session_id=sid, inputs=x) for sid in ids[1:]],
                close_sessions_on_end=True,
            )
        )
        keeping = stub.StreamSteps()
        await keeping.write(
            pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=kept, inputs=x)])
        )
        answered = 0
        while answered < len(ids):
            answered += len((await releasing.read()).results)
        assert len((await keeping.read()).results) == 1
        await _replace_every_frontend(frontends_to_kill)
    async with grpc.aio.insecure_channel(frontends_to_kill.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for _ in range(100):
            states = []
            for sid in ids:
                try:
                    await stub.GetSession(pb.GetSessionRequest(session_id=sid))
                    states.append("open")
                except grpc.aio.AioRpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND
                    states.append(dict(error.trailing_metadata())["rnnserve-error-reason"])
            if states == ["SESSION_CLOSED"] * len(ids):
                break
            await asyncio.sleep(0.05)
        assert states == ["SESSION_CLOSED"] * len(ids)
        # A stream that did not ask leaves its sessions open.
        assert (await stub.GetSession(pb.GetSessionRequest(session_id=kept))).session.position == 1


async def test_empty_inputs_of_a_huge_shape_are_answered_as_with_one_frontend(
    each_channel: grpc.aio.Channel,
) -> None:
    # An empty tensor may name extents whose product numpy cannot index once a leading axis
    # is added: a frontend's alike steps used to cross the pipe as one (steps, *shape) array,
    # which the engine could not rebuild, and every step of that message (any caller's) was
    # never answered.
    stub = pb_grpc.InferenceServiceStub(each_channel)
    sid = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm"))).session.session_id
    empty = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[0, 1 << 60], data=b"")
    call = stub.StreamSteps(timeout=30)
    await call.write(
        pb.StreamStepsRequest(
            steps=[
                pb.StepRequest(session_id=sid, request_id=str(n), inputs={"x": empty})
                for n in range(2)
            ]
        )
    )
    results = []
    while len(results) < 2:
        results += (await asyncio.wait_for(call.read(), 10)).results
    assert [r.request_id for r in results] == ["0", "1"]
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in results)
    x = {"x": from_array(np.zeros((1, 4), np.float32))}
    await call.write(pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=sid, inputs=x)]))
    assert (await asyncio.wait_for(call.read(), 10)).results[0].response.position == 1
    await call.done_writing()


def test_ctrl_c_stops_the_server_in_order_not_each_frontend_on_its_own(
    test_repository: Path,
) -> None:
    # Ctrl-C signals every process of the terminal's group. A frontend ignores it (the
    # server's own process stops the frontends in order, by SIGTERM), so none is stopped,
    # taken for crashed and restarted in the middle of the server's stop.
    import time

    with ServerProcess(test_repository, "--frontends", "2") as process:
        assert process.process is not None
        children = _frontend_processes(process.process.pid)
        for pid in children:
            os.kill(pid, signal.SIGINT)
        time.sleep(2.0)  # two supervisor rounds: a frontend that had exited is replaced by now
        assert _frontend_processes(process.process.pid) == children
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"), timeout=10)
        os.kill(process.process.pid, signal.SIGINT)
        assert process.process.wait(30) == 0
    assert "event=frontend_exited" not in process.stderr()
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def test_a_frontend_slow_to_restart_holds_up_no_other_restart(test_repository: Path) -> None:
    # Each restart waits for its own process: while a replacement is still starting (here
    # stopped before it is ready), another frontend that dies is replaced all the same.
    import time

    def new_child(known: set[int]) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            fresh = set(_frontend_processes(server_pid)) - known
            if fresh:
                return fresh.pop()
            time.sleep(0.02)
        raise AssertionError("no frontend was started in 20 s")

    with ServerProcess(test_repository, "--frontends", "2") as process:
        assert process.process is not None
        server_pid = process.process.pid
        first, second = _frontend_processes(server_pid)
        os.kill(first, signal.SIGKILL)
        slow = new_child({first, second})
        os.kill(slow, signal.SIGSTOP)  # caught before it could have said it serves
        try:
            os.kill(second, signal.SIGKILL)
            new_child({first, second, slow})  # replaced while the first replacement waits
        finally:
            os.kill(slow, signal.SIGCONT)
        for _ in range(100):  # both serve: every connection gets an answer
            try:
                with grpc.insecure_channel(process.address) as channel:
                    stub = pb_grpc.InferenceServiceStub(channel)
                    stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn"), timeout=5)
                break
            except grpc.RpcError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server does not serve after its frontends were replaced")
