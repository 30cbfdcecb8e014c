"""What one connection may cost a real ``rnnserve serve``: finding 5 of the isolation issue.

- A caller without a token is refused on its headers: the server does not read its message,
  so big unauthenticated messages cost the server next to nothing (RSS read from /proc).
- The receive limit is sized from the repository's models unless a flag says otherwise.
- A unary call whose message never arrives, and a stream that goes silent, are ended with
  DEADLINE_EXCEEDED by the server instead of being held forever.
- Connections with no call are closed after the idle limit, and a client that pings too
  often is sent away.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from reliability.harness import (
    INPUT_SIZE,
    MODEL,
    ServerProcess,
    build_repository,
    inputs_for,
    step_request,
    stub,
)
from rnnserve.server.frontend.limits import GRPC_DEFAULT_BYTES, message_limit
from rnnserve.server.repository import scan_repository
from rnnserve.v1 import inference_service_pb2 as pb

from .identities import ALICE, BOB, auth, token_file
from .memory import PeakRss, rss_mb, tree_rss_mb

STEP = "/rnnserve.v1.InferenceService/Step"
BIG_MESSAGES = 8
BIG_BYTES = 48 << 20
# Reading BIG_MESSAGES messages of 48 MB whole costs the server at least their size (it took
# RSS from 131 to 854 MB for 16 of them before the check moved to the headers); refused on
# their headers, only what HTTP/2 flow control lets through is ever buffered.
RSS_GROWTH_BOUND_MB = 96


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Tokens on, the old 64 MiB limit (so size is not what refuses the big messages), and
    short stalled-call limits."""
    folder = tmp_path_factory.mktemp("limits")
    tokens = token_file(folder)
    server = ServerProcess(
        build_repository(folder / "repository"),
        *("--token-file", str(tokens), "--max-message-bytes", str(64 << 20)),
        *("--body-timeout-s", "1", "--stream-idle-s", "1.5"),
        log_path=folder / "server.log",
    ).start()
    yield server
    server.stop()


def test_unauthenticated_messages_are_refused_before_they_are_read(
    limited_server: ServerProcess,
) -> None:
    assert limited_server.process is not None
    big = step_request("x", np.zeros((BIG_BYTES // (4 * INPUT_SIZE), INPUT_SIZE), np.float32))
    options = [("grpc.max_send_message_length", 1 << 30)]
    before = rss_mb(limited_server.process.pid)
    with grpc.insecure_channel(limited_server.address, options=options) as channel:
        service = stub(channel)
        with PeakRss(limited_server.process.pid) as rss:
            calls = [service.Step.future(big, timeout=60) for _ in range(BIG_MESSAGES)]
            codes = {call.exception().code() for call in calls}  # type: ignore[union-attr]
        assert codes == {grpc.StatusCode.UNAUTHENTICATED}
        growth = rss.peak - before
        print(f"server RSS {before:.0f} MiB, peak {rss.peak:.0f} MiB ({growth:+.0f})")
        assert growth < RSS_GROWTH_BOUND_MB
        # The same server still reads whole messages of callers that have a token.
        opened = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        reply = service.Step(
            step_request(opened.session.session_id, inputs_for(0, 0)), metadata=auth(ALICE)
        )
        assert reply.position == 1


def test_a_unary_call_whose_message_never_arrives_is_ended(
    limited_server: ServerProcess,
) -> None:
    with grpc.insecure_channel(limited_server.address) as channel:
        # A client-streaming call on the unary method: headers go out, the message never does
        # and the call is never half-closed, exactly what a stalled half-sent call looks like.
        stalled = channel.stream_unary(
            STEP, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        never = threading.Event()

        def nothing() -> Iterator[bytes]:
            never.wait(30)
            yield from ()

        with pytest.raises(grpc.RpcError) as caught:
            stalled(nothing(), metadata=auth(ALICE), timeout=30)
        never.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not arrive within 1 s" in (caught.value.details() or "")


def test_a_silent_stream_is_ended_and_its_session_goes_on(limited_server: ServerProcess) -> None:
    with grpc.insecure_channel(limited_server.address) as channel:
        service = stub(channel)
        opened = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        session = opened.session.session_id
        hold = threading.Event()
        sent_at: list[float] = []

        def steps(count: int, pause_s: float) -> Iterator[pb.StreamStepsRequest]:
            for n in range(count):
                sent_at.append(time.monotonic())
                yield pb.StreamStepsRequest(steps=[step_request(session, inputs_for(0, n))])
                time.sleep(pause_s)
            hold.wait(30)  # then silent, never half-closed

        # A stream that keeps talking (a message every 0.5 s for 3 s) is not idle...
        replies = service.StreamSteps(steps(6, 0.5), metadata=auth(ALICE), timeout=30)
        positions = []
        with pytest.raises(grpc.RpcError) as caught:
            for reply in replies:
                positions += [r.response.position for r in reply.results]
        hold.set()
        assert positions == [1, 2, 3, 4, 5, 6]
        # ...and once it goes silent with nothing outstanding, the server ends it.
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "idle" in (caught.value.details() or "")
        reply = service.Step(step_request(session, inputs_for(0, 6)), metadata=auth(ALICE))
        assert reply.position == 7


def test_a_silent_stream_that_asked_to_release_is_ended_and_its_session_closed(
    limited_server: ServerProcess,
) -> None:
    with grpc.insecure_channel(limited_server.address) as channel:
        service = stub(channel)
        opened = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        session = opened.session.session_id
        hold = threading.Event()

        def steps() -> Iterator[pb.StreamStepsRequest]:
            yield pb.StreamStepsRequest(
                steps=[step_request(session, inputs_for(0, 0))], close_sessions_on_end=True
            )
            hold.wait(30)  # then silent, never half-closed

        replies = service.StreamSteps(steps(), metadata=auth(ALICE), timeout=30)
        positions = []
        with pytest.raises(grpc.RpcError) as caught:
            for reply in replies:
                positions += [r.response.position for r in reply.results]
        hold.set()
        assert positions == [1]
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "its sessions are closed, as it asked" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as gone:
            for _ in range(100):  # closed by the server once the call has ended
                service.GetSession(pb.GetSessionRequest(session_id=session), metadata=auth(ALICE))
                time.sleep(0.05)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_default_receive_limit_is_sized_from_the_models(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    # The test LSTM takes 64 steps of 4 floats and 2 x 8 floats of state: gRPC's 4 MiB floor.
    assert message_limit(scan_repository(repository).all()) == GRPC_DEFAULT_BYTES
    long = build_repository(tmp_path / "long", max_timesteps=1_000_000)
    largest = 1_000_000 * INPUT_SIZE * 4 + 2 * 8 * 4
    assert message_limit(scan_repository(long).all()) == 2 * largest + (64 << 10)
    with ServerProcess(repository, log_path=tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.address) as channel:
            service = stub(channel)
            service.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="s"))
            rows = GRPC_DEFAULT_BYTES // (4 * INPUT_SIZE) + 16
            with pytest.raises(grpc.RpcError) as caught:
                service.Step(step_request("s", np.zeros((rows, INPUT_SIZE), np.float32)))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert service.Step(step_request("s", inputs_for(0, 0))).position == 1


class States:
    """The connectivity states a channel goes through (grpc's public subscribe API)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.seen: list[grpc.ChannelConnectivity] = []
        self._changed = threading.Condition()
        channel.subscribe(self._record, try_to_connect=False)

    def _record(self, state: grpc.ChannelConnectivity) -> None:
        with self._changed:
            self.seen.append(state)
            self._changed.notify_all()

    def wait_for_leaving_ready(self, timeout_s: float) -> bool:
        """True once the channel was READY and then left it (the server closed it)."""

        def left() -> bool:
            ready = grpc.ChannelConnectivity.READY
            return ready in self.seen and self.seen[-1] != ready

        with self._changed:
            return self._changed.wait_for(left, timeout_s)


def test_idle_connections_are_closed(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    args = ("--connection-idle-s", "1", "--min-client-ping-s", "10")
    with ServerProcess(repository, *args, log_path=tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.address) as channel:
            states = States(channel)
            stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert states.wait_for_leaving_ready(20), states.seen  # GOAWAY after 1 s idle
            stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)  # reconnects


def test_a_client_that_pings_too_often_is_sent_away(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    with ServerProcess(repository, log_path=tmp_path / "server.log") as server:
        # Pings every 100 ms, far more often than the default 10 s allows: GOAWAY.
        flood = [
            ("grpc.keepalive_time_ms", 100),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        with grpc.insecure_channel(server.address, options=flood) as channel:
            states = States(channel)
            stub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
            assert states.wait_for_leaving_ready(20), states.seen


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--stream-idle-s", "-1"),
        ("--keepalive-s", "nan"),
        ("--max-message-bytes", "-5"),
        ("--steps-per-identity", "0"),
        ("--bytes-per-identity", "0"),
        ("--bytes-per-identity", "-1"),
        ("--unsent-bytes-per-stream", "0"),
    ],
)
def test_bad_limit_flags_are_refused_at_start(tmp_path: Path, flag: str, value: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.server",
            "serve",
            "--repository",
            str(tmp_path),
            flag,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert flag in result.stderr


def test_one_identity_queueing_thousands_of_steps_does_not_starve_another(
    limited_server: ServerProcess,
) -> None:
    """alice streams 8,192 valid steps on one session (the engine runs them one per batch):
    without a bound per identity they fill the model's queue (4,096 steps) and every other
    identity's steps are refused QUEUE_FULL until they drain. With it, alice's stream waits
    and bob's steps are all served."""
    with grpc.insecure_channel(limited_server.address) as channel:
        service = stub(channel)
        own = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        theirs = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(BOB))
        flood = [
            pb.StreamStepsRequest(
                steps=[step_request(own.session.session_id, inputs_for(1, n)) for n in range(512)]
            )
            for _ in range(16)
        ]
        replies = service.StreamSteps(iter(flood), metadata=auth(ALICE), timeout=120)
        alice = [result for result in next(replies).results]  # the flood is queued and running
        positions = [
            service.Step(
                step_request(theirs.session.session_id, inputs_for(2, n)),
                metadata=auth(BOB),
                timeout=60,
            ).position
            for n in range(50)
        ]
        alice += [result for reply in replies for result in reply.results]
    assert positions == list(range(1, 51))
    # alice was held back, not refused: every one of her steps was applied in order.
    assert [r.response.position for r in alice] == list(range(1, 16 * 512 + 1))


@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x0a\x05abc"], ids=["ff", "short-field"])
def test_bytes_that_are_not_a_unary_request_are_invalid_argument(
    limited_server: ServerProcess, garbage: bytes
) -> None:
    """The message is read by rnnserve now, so undecodable bytes get INVALID_ARGUMENT
    (gRPC answered UNKNOWN with the parser's exception class when it decoded them)."""
    with grpc.insecure_channel(limited_server.address) as channel:
        raw = channel.unary_unary(
            STEP, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(garbage, metadata=auth(ALICE), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in (caught.value.details() or "")


def test_unary_steps_past_the_identitys_budget_are_refused_at_once(tmp_path: Path) -> None:
    """Streams past the budget are held back; unary steps are refused with
    RESOURCE_EXHAUSTED (QUOTA_EXCEEDED) rather than queued silently in the frontend."""
    tokens = token_file(tmp_path)
    repository = build_repository(tmp_path / "repository", max_timesteps=2048)
    args = ("--token-file", str(tokens), "--steps-per-identity", "4")
    with ServerProcess(repository, *args, log_path=tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.address) as channel:
            service = stub(channel)
            own = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
            other = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
            bobs = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(BOB))
            flood = [
                pb.StreamStepsRequest(
                    steps=[
                        step_request(own.session.session_id, inputs_for(1, n, 2048))
                        for n in range(32)
                    ]
                )
                for _ in range(8)
            ]
            replies = service.StreamSteps(iter(flood), metadata=auth(ALICE), timeout=120)
            next(replies)
            # The stream holds the whole budget (taking each step's share back as soon as it
            # is answered, and each of its steps runs 2,048 timesteps), so of a burst of
            # unary steps many find none left.
            calls = [
                service.Step.future(
                    step_request(other.session.session_id, inputs_for(3, n)),
                    metadata=auth(ALICE),
                    timeout=30,
                )
                for n in range(50)
            ]
            codes, reasons = [], set()
            for call in calls:
                try:
                    call.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    reasons.add(dict(exc.trailing_metadata() or ()).get("rnnserve-error-reason"))
            # bob has a budget of his own.
            bob = service.Step(
                step_request(bobs.session.session_id, inputs_for(2, 0)), metadata=auth(BOB)
            )
            replies.cancel()
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert reasons == {"QUOTA_EXCEEDED"}
    assert bob.position == 1


def test_one_message_of_thousands_of_steps_is_held_to_the_identitys_budget(
    limited_server: ServerProcess,
) -> None:
    """The budget bounds steps, not messages: alice packs 8,192 valid steps of one session
    into a single StreamSteps message (0.5 MB, well within the receive limit). Handed to the
    engine whole, they filled the model's queue (4,096 steps) past her budget and bob's steps
    were refused QUEUE_FULL; admitted a budget's worth at a time, bob's are all served and
    every one of alice's is still applied, in order."""
    with grpc.insecure_channel(limited_server.address) as channel:
        service = stub(channel)
        own = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        theirs = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(BOB))
        flood = pb.StreamStepsRequest(
            steps=[step_request(own.session.session_id, inputs_for(1, n)) for n in range(8192)]
        )
        replies = service.StreamSteps(iter([flood]), metadata=auth(ALICE), timeout=120)
        alice = [result for result in next(replies).results]  # the flood is queued and running
        codes = []
        for n in range(50):
            try:
                service.Step(
                    step_request(theirs.session.session_id, inputs_for(2, n)),
                    metadata=auth(BOB),
                    timeout=60,
                )
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        alice += [result for reply in replies for result in reply.results]
    assert codes == [grpc.StatusCode.OK] * 50
    assert [r.response.position for r in alice] == list(range(1, 8192 + 1))


@pytest.mark.parametrize("frontends", [1, 2])
def test_a_stream_naming_unknown_sessions_does_not_grow_the_server(
    tmp_path: Path, frontends: int
) -> None:
    """A stream remembers the sessions it stepped (``close_sessions_on_end`` closes them at
    its end), but it kept every id it named for as long as it lasted, in the frontend and,
    with several frontends, in the engine too: a stream naming made-up ids (each answered
    NOT_FOUND at once) grew the server by their size, without bound. An id answered
    NOT_FOUND is not one of the stream's sessions and is not kept: past the first quarter
    of 512 MiB of such ids the server no longer grows."""
    tokens = token_file(tmp_path)
    repository = build_repository(tmp_path / "repository")
    args = ("--token-file", str(tokens), "--frontends", str(frontends))
    with ServerProcess(repository, *args, log_path=tmp_path / "server.log") as server:
        assert server.process is not None
        pid = server.process.pid
        with grpc.insecure_channel(server.address) as channel:
            service = stub(channel)
            own = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
            mine = own.session.session_id
            x = inputs_for(0, 0)
            hold = threading.Event()
            messages, per_message = 512, 16

            def flood() -> Iterator[pb.StreamStepsRequest]:
                yield pb.StreamStepsRequest(
                    steps=[step_request(mine, x)], close_sessions_on_end=True
                )
                for n in range(messages):
                    yield pb.StreamStepsRequest(
                        steps=[
                            step_request(f"{n:04d}{k:02d}" + "x" * (64 << 10), x)
                            for k in range(per_message)
                        ]
                    )
                hold.wait(30)  # the stream stays open while the server's memory is read

            replies = service.StreamSteps(flood(), metadata=auth(ALICE), timeout=60)
            results: list[pb.StepResult] = []
            rss: list[float] = []
            for reply in replies:
                results += reply.results
                if not rss and len(results) > messages * per_message // 4:
                    rss.append(tree_rss_mb(pid))
                if len(results) == 1 + messages * per_message:
                    break
            rss.append(tree_rss_mb(pid))
            hold.set()
            replies.cancel()
            print(f"server RSS {rss[0]:.0f} MiB after a quarter, {rss[1]:.0f} MiB at the end")
            assert results[0].response.position == 1
            assert {r.error.code for r in results[1:]} == {grpc.StatusCode.NOT_FOUND.value[0]}
            assert rss[1] - rss[0] < 96  # 384 MiB of ids named meanwhile
            # The session the stream did step is still closed when it ends.
            reason = None
            for _ in range(100):
                try:
                    service.GetSession(pb.GetSessionRequest(session_id=mine), metadata=auth(ALICE))
                except grpc.RpcError as exc:
                    reason = dict(exc.trailing_metadata() or ()).get("rnnserve-error-reason")
                    break
                time.sleep(0.05)
            assert reason == "SESSION_CLOSED"


def test_results_a_stream_does_not_read_are_not_as_large_as_its_ids(tmp_path: Path) -> None:
    """Each StreamSteps result echoes its step's session id and request id. A stream whose
    client never reads may have 4,096 results waiting; with ids of 64 KiB echoed whole,
    that was 256 MiB held for one stream of one identity (more for more streams, and up to
    the message limit per id). An id past 128 characters names no session: it is echoed
    cut (the step is NOT_FOUND as before), and a request id past 128 characters is refused
    (INVALID_ARGUMENT, in its session's turn, the session unchanged), echoed cut."""
    tokens = token_file(tmp_path)
    repository = build_repository(tmp_path / "repository")
    args = ("--token-file", str(tokens))
    with ServerProcess(repository, *args, log_path=tmp_path / "server.log") as server:
        assert server.process is not None
        pid = server.process.pid
        with grpc.insecure_channel(server.address) as channel:
            service = stub(channel)
            own = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
            mine = own.session.session_id
            x = inputs_for(0, 0)
            long = "x" * (64 << 10)
            before = rss_mb(pid)
            sent = threading.Event()

            def flood() -> Iterator[pb.StreamStepsRequest]:
                for n in range(256):
                    yield pb.StreamStepsRequest(
                        steps=[
                            step_request(f"{n:04d}{k:02d}{long}", x)
                            if k % 2
                            else step_request(mine, x, request_id=f"{n:04d}{k:02d}{long}")
                            for k in range(16)
                        ]
                    )
                sent.set()

            replies = service.StreamSteps(flood(), metadata=auth(ALICE), timeout=60)
            assert sent.wait(30)
            time.sleep(2)  # every step answered, its result waiting: the client reads nothing
            growth = rss_mb(pid) - before
            results: list[pb.StepResult] = []
            for reply in replies:
                results += reply.results
                if len(results) == 4096:
                    break
            replies.cancel()
            print(f"server RSS {before:.0f} MiB, {growth:+.0f} MiB with the results unread")
            assert growth < 96
            assert max(len(r.session_id) for r in results) <= 131
            assert max(len(r.request_id) for r in results) <= 131
            codes = {r.error.code for r in results}
            assert codes == {
                grpc.StatusCode.NOT_FOUND.value[0],
                grpc.StatusCode.INVALID_ARGUMENT.value[0],
            }
            reply = service.GetSession(pb.GetSessionRequest(session_id=mine), metadata=auth(ALICE))
            assert reply.session.position == 0
