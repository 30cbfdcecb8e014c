"""Two identities on one real server: one attacks with every bad input, the other must not notice.

``bob`` streams 100 sessions x 200 steps of the char-LM ``charlm`` (one StreamSteps call, one
step per session per message), first on a quiet server, then again, with new sessions and the
same inputs, while ``alice`` sends everything the isolation issue found: positions at the
2**62 limit and past 2**63, token ids out of the embedding's range (-1, -97, 96, 10**9),
tensors of rank 100, of the wrong dtype, of the wrong byte length, past max_timesteps and
past the message limit, 10,000-character ids, unknown model names, bob's own session ids
(as if leaked), calls without a token, a unary call whose message never comes, and streams
that stall or never read their replies.

Every one of bob's 20,000 steps must succeed with outputs bit-identical to the quiet run,
every one of alice's attacks must get an error (the code is each check's business, tested
where that check lives), and the server's RSS must stay within RSS_BOUND_MB of what the
quiet run left it at.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

from .identities import ALICE, BOB, auth, token_file  # ALICE attacks, BOB is the victim
from .memory import PeakRss, rss_mb

MODEL = "charlm"
VOCABULARY = 96
SESSIONS = 100
STEPS = 200
#: Peak server RSS under attack may exceed the level the quiet run left by at most this much:
#: two never-read streams hold at most 4,096 replies each (a few MB of logits), and nothing
#: alice sends is kept (a message past the limit is refused by gRPC, one without a token is
#: refused on its headers).
RSS_BOUND_MB = 256
OK = grpc.StatusCode.OK


def _tokens(*values: int) -> tensor_pb2.Tensor:
    return from_array(np.asarray(values, np.int64))


def _victim_tokens() -> np.ndarray:
    """bob's inputs: one valid token id per session and step, the same on every run."""
    return np.random.default_rng(13).integers(0, VOCABULARY, (SESSIONS, STEPS), dtype=np.int64)


def run_victim(service: pb_grpc.InferenceServiceStub, failures: list[str]) -> dict[str, bytes]:
    """bob's workload on one StreamSteps call; logits bytes by "session:step"."""
    tokens = _victim_tokens()
    ids = [
        service.OpenSession(
            pb.OpenSessionRequest(model=MODEL), metadata=auth(BOB), timeout=30
        ).session.session_id
        for _ in range(SESSIONS)
    ]

    def requests() -> Iterator[pb.StreamStepsRequest]:
        for t in range(STEPS):
            yield pb.StreamStepsRequest(
                steps=[
                    pb.StepRequest(
                        session_id=ids[s],
                        request_id=f"{s}:{t}",
                        inputs={"tokens": _tokens(tokens[s, t])},
                    )
                    for s in range(SESSIONS)
                ]
            )

    outputs: dict[str, bytes] = {}
    for reply in service.StreamSteps(requests(), metadata=auth(BOB), timeout=120):
        for result in reply.results:
            if result.WhichOneof("outcome") != "response":
                failures.append(f"{result.request_id}: {result.error.message}")
                continue
            step = int(result.request_id.split(":")[1])
            if result.response.position != step + 1:
                failures.append(f"{result.request_id}: position {result.response.position}")
            outputs[result.request_id] = result.response.outputs["logits"].data
    for session_id in ids:
        service.CloseSession(pb.CloseSessionRequest(session_id=session_id), metadata=auth(BOB))
    return outputs


def _code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return OK


def _stream_code(service: pb_grpc.InferenceServiceStub, step: pb.StepRequest) -> grpc.StatusCode:
    """A bad step on a stream: its own StepError, or the call's status if the call ends."""
    try:
        for reply in service.StreamSteps(
            iter([pb.StreamStepsRequest(steps=[step])]), metadata=auth(ALICE), timeout=30
        ):
            for result in reply.results:
                if result.WhichOneof("outcome") == "error":
                    return grpc.StatusCode(
                        next(c for c in grpc.StatusCode if c.value[0] == result.error.code)
                    )
                return OK
    except grpc.RpcError as exc:
        return exc.code()
    return OK


class Attacker:
    """alice's attacks, each returning the status it got."""

    def __init__(self, channel: grpc.Channel, victim_ids: list[str]) -> None:
        self.channel = channel
        self.service = pb_grpc.InferenceServiceStub(channel)
        self.victim_ids = victim_ids
        opened = self.service.OpenSession(
            pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE), timeout=30
        )
        self.own = opened.session.session_id

    def step(
        self, session_id: str, tensor: tensor_pb2.Tensor, name: str = "tokens"
    ) -> grpc.StatusCode:
        request = pb.StepRequest(session_id=session_id, inputs={name: tensor})
        return _code(lambda: self.service.Step(request, metadata=auth(ALICE), timeout=30))

    def near_limit_position(self, position: int, timesteps: int) -> grpc.StatusCode:
        """Open at ``position``, then step ``timesteps`` tokens: one of the two must fail."""
        request = pb.OpenSessionRequest(model=MODEL, initial_position=position)
        try:
            opened = self.service.OpenSession(request, metadata=auth(ALICE), timeout=30)
        except grpc.RpcError as exc:
            return exc.code()
        session_id = opened.session.session_id
        code = self.step(session_id, _tokens(*([1] * timesteps)))
        self.service.CloseSession(
            pb.CloseSessionRequest(session_id=session_id), metadata=auth(ALICE)
        )
        return code

    def attacks(self) -> dict[str, Callable[[], grpc.StatusCode]]:
        s, own = self.service, self.own
        victim = self.victim_ids
        rank100 = tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_INT64, shape=[1] * 100, data=b"\0" * 8
        )
        long_id = "x" * 10_000
        huge = from_array(np.zeros(5 << 20, np.uint8).view(np.int64))  # 5 MiB, past the 4 MiB limit
        return {
            "position 2**62 - 1, then 2 steps": lambda: self.near_limit_position(2**62 - 1, 2),
            "position 2**63 - 1": lambda: self.near_limit_position(2**63 - 1, 1),
            "position -1": lambda: self.near_limit_position(-1, 1),
            "token -1": lambda: self.step(own, _tokens(-1)),
            "token -97": lambda: self.step(own, _tokens(-97)),
            "token 96": lambda: self.step(own, _tokens(VOCABULARY)),
            "token 10**9": lambda: self.step(own, _tokens(10**9)),
            "token 10**9 streamed": lambda: _stream_code(
                s, pb.StepRequest(session_id=own, inputs={"tokens": _tokens(3, 10**9)})
            ),
            "rank 100": lambda: self.step(own, rank100),
            "float32 tokens": lambda: self.step(own, from_array(np.ones(1, np.float32))),
            "byte length": lambda: self.step(
                own, tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_INT64, shape=[4], data=b"\0" * 9)
            ),
            "past max_timesteps": lambda: self.step(own, _tokens(*([1] * 4097))),
            "past the message limit": lambda: self.step(own, huge),
            "unknown input": lambda: self.step(own, _tokens(1), name="not_an_input"),
            "10,000-char id step": lambda: self.step(long_id, _tokens(1)),
            "10,000-char id open": lambda: _code(
                lambda: s.OpenSession(
                    pb.OpenSessionRequest(model=MODEL, session_id=long_id), metadata=auth(ALICE)
                )
            ),
            "unknown model": lambda: _code(
                lambda: s.OpenSession(
                    pb.OpenSessionRequest(model=f"no-such-model-{time.monotonic_ns()}"),
                    metadata=auth(ALICE),
                )
            ),
            "victim's id: step": lambda: self.step(victim[0], _tokens(1)),
            "victim's id: stream": lambda: _stream_code(
                s, pb.StepRequest(session_id=victim[1], inputs={"tokens": _tokens(1)})
            ),
            "victim's id: reset": lambda: _code(
                lambda: s.ResetSession(
                    pb.ResetSessionRequest(session_id=victim[2]), metadata=auth(ALICE)
                )
            ),
            "victim's id: close": lambda: _code(
                lambda: s.CloseSession(
                    pb.CloseSessionRequest(session_id=victim[3]), metadata=auth(ALICE)
                )
            ),
            "victim's id: export": lambda: _code(
                lambda: s.ExportState(
                    pb.ExportStateRequest(session_id=victim[4]), metadata=auth(ALICE)
                )
            ),
            "victim's id: fork": lambda: _code(
                lambda: s.ForkSession(
                    pb.ForkSessionRequest(session_id=victim[5]), metadata=auth(ALICE)
                )
            ),
            "no token, 8 MB": lambda: _code(
                lambda: s.Step(
                    pb.StepRequest(
                        session_id=victim[6],
                        inputs={"tokens": from_array(np.zeros(1 << 20, np.int64))},
                    ),
                    metadata=auth(None),
                    timeout=30,
                )
            ),
            "stolen-looking token": lambda: _code(
                lambda: s.GetSession(
                    pb.GetSessionRequest(session_id=victim[7]), metadata=auth(BOB[:-1] + "y")
                )
            ),
        }


class Staller:
    """Calls that hold the server's resources: a unary call whose message never comes, a
    stream that sends one step then goes silent, and streams that never read their replies."""

    def __init__(self, channel: grpc.Channel, own: str) -> None:
        self.release = threading.Event()
        self.codes: dict[str, grpc.StatusCode] = {}
        self._threads: list[threading.Thread] = []
        service = pb_grpc.InferenceServiceStub(channel)
        self._unread: list[grpc.Future] = []
        stalled_unary = channel.stream_unary(
            "/rnnserve.v1.InferenceService/Step",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        self._run(
            "stalled unary body",
            lambda: stalled_unary(self._then_silent([]), metadata=auth(ALICE), timeout=60),
        )
        one = [
            pb.StreamStepsRequest(
                steps=[pb.StepRequest(session_id=own, inputs={"tokens": _tokens(1)})]
            )
        ]
        self._run(
            "silent stream",
            lambda: list(
                service.StreamSteps(self._then_silent(one), metadata=auth(ALICE), timeout=60)
            ),
        )
        for _ in range(2):
            flood = [
                pb.StreamStepsRequest(
                    steps=[
                        pb.StepRequest(
                            session_id=own,
                            request_id=str(n),
                            inputs={"tokens": _tokens(*([2] * 16))},
                        )
                        for n in range(256)
                    ]
                )
                for _ in range(40)
            ]
            # Started and never iterated: the replies are never read.
            self._unread.append(
                service.StreamSteps(self._then_silent(flood), metadata=auth(ALICE), timeout=120)
            )

    def _then_silent(self, messages: list) -> Iterator:
        yield from messages
        self.release.wait(90)

    def _run(self, label: str, call: Callable[[], object]) -> None:
        def run() -> None:
            self.codes[label] = _code(call)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def finish(self) -> dict[str, grpc.StatusCode]:
        self.release.set()
        for call in self._unread:
            call.cancel()
        for thread in self._threads:
            thread.join(60)
        return self.codes


@pytest.fixture(scope="module")
def chaos_server(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    if not (default_repository / MODEL).is_dir():
        pytest.skip(f"the default repository has no {MODEL}")
    folder = tmp_path_factory.mktemp("chaos")
    tokens = token_file(folder)
    server = ServerProcess(
        default_repository,
        *("--token-file", str(tokens), "--body-timeout-s", "2", "--stream-idle-s", "3"),
        log_path=folder / "server.log",
    ).start()
    yield server
    server.stop()


def test_an_attacker_cannot_touch_another_identitys_streams(chaos_server: ServerProcess) -> None:
    assert chaos_server.process is not None
    pid = chaos_server.process.pid
    with grpc.insecure_channel(chaos_server.address) as bob_channel:
        victim = pb_grpc.InferenceServiceStub(bob_channel)
        quiet_failures: list[str] = []
        quiet = run_victim(victim, quiet_failures)
        assert not quiet_failures and len(quiet) == SESSIONS * STEPS
        settled = rss_mb(pid)

        # Long-lived victim sessions whose ids alice has "stolen"; they must stay untouched.
        stolen = [
            victim.OpenSession(
                pb.OpenSessionRequest(model=MODEL), metadata=auth(BOB)
            ).session.session_id
            for _ in range(8)
        ]
        options = [("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(chaos_server.address, options=options) as alice_channel:
            attacker = Attacker(alice_channel, stolen)
            staller = Staller(alice_channel, attacker.own)
            attacks = attacker.attacks()
            got: dict[str, set[grpc.StatusCode]] = {label: set() for label in attacks}
            done = threading.Event()
            rounds = 0

            def attack() -> None:
                nonlocal rounds
                while not done.is_set():
                    for label, call in attacks.items():
                        got[label].add(call())
                    rounds += 1

            attackers = [threading.Thread(target=attack, daemon=True) for _ in range(2)]
            loud_failures: list[str] = []
            with PeakRss(pid) as rss:
                for thread in attackers:
                    thread.start()
                loud = run_victim(victim, loud_failures)
                done.set()
                for thread in attackers:
                    thread.join(60)
                stalled = staller.finish()

        # bob: every step served, bit-identical to the quiet run.
        assert loud_failures == []
        assert len(loud) == SESSIONS * STEPS
        differing = [key for key, value in quiet.items() if loud[key] != value]
        assert differing == [], f"{len(differing)} steps differ, e.g. {differing[:3]}"
        # bob's stolen sessions: still his, never stepped, reset, closed or forked by alice.
        for session_id in stolen:
            session = victim.GetSession(
                pb.GetSessionRequest(session_id=session_id), metadata=auth(BOB)
            )
            assert session.session.position == 0
        # alice: every attack answered with an error, every stalled call ended.
        assert rounds >= 1
        succeeded = {label: codes for label, codes in got.items() if OK in codes}
        assert succeeded == {}, succeeded
        # Each bad input reached its own check at least once, not only alice's step budget
        # (her never-read streams keep it full much of the time: RESOURCE_EXHAUSTED).
        budget_only = {
            label
            for label, codes in got.items()
            if codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED} and label != "past the message limit"
        }
        assert budget_only == set()
        assert set(stalled) == {"stalled unary body", "silent stream"}
        assert stalled["stalled unary body"] == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stalled["silent stream"] == grpc.StatusCode.DEADLINE_EXCEEDED
        print(
            f"RSS after the quiet run {settled:.0f} MiB, peak under attack {rss.peak:.0f} MiB; "
            f"{rounds} rounds of {len(attacks)} attacks; codes "
            + ", ".join(
                f"{label}: {'/'.join(sorted(c.name for c in codes))}"
                for label, codes in got.items()
            )
        )
        assert rss.peak - settled < RSS_BOUND_MB
