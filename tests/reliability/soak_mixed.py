"""The mixed soak's driver: every lane does a different thing each round, all at once.

Each round, every active lane draws one action from its own seeded generator: a step in a
multiplexed stream (all such lanes of a group share one stream and one message per step),
unary Steps, a stream of its own (steps pipelined, in one message or several), a reset, a
fork stepped on a branch of its own and closed (by CloseSession or close_sessions_on_end),
an export, a reopen from the exported state, a move to the new model version, or a retried
step: the same step sent again after its reply came (answered from the stored reply), after
its reply was "lost" (a deadline too short to get it, a stream cancelled right after
writing), or twice in one stream. Every step carries ``expected_position``.

Replicas: calls go to one replica, or alternate between two (``alternate``); a replica can be
drained mid-run (:meth:`MixedSoak.drain`): UNAVAILABLE and CANCELLED then send the call to the
other replica, with the same ``expected_position`` for steps, so a step is applied once
whichever replica answers. Any other error is recorded in :attr:`MixedSoak.errors` (the test
asserts there are none) and the lane's action stops there.

Model versions: :meth:`MixedSoak.load_version` puts version 2 in place and loads it on every
replica (reopened lanes land on it, moves carry lanes to it); :meth:`MixedSoak.retire_version`
retires version 1 (forks of its lanes must then be refused, VERSION_RETIRING).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb

from .harness import MODEL, ServerProcess, build_lstm, step_request, stub, tensor, to_array
from .soak_lanes import STATE_NAMES, Fork, Lane, Track, some_state

T = TypeVar("T")

#: Actions and their weights. ``mux`` steps share a stream with the other lanes of a group.
ACTIONS = {
    "mux": 30,
    "unary": 14,
    "single": 12,
    "retry": 8,
    "lost": 6,
    "reset": 5,
    "fork": 7,
    "export": 5,
    "reopen": 5,
    "move": 3,
}
STREAMS = 4  # groups of lanes stepping on one multiplexed stream each
CHANNELS = 16  # connections per replica: SO_REUSEPORT spreads them over the frontends
TIMESTEPS = (1, 1, 1, 1, 2, 3)  # chunk sizes a step draws from
TRIES = 60  # tries of one call before it counts as an error (transient failures only)
CALL_TIMEOUT_S = 30.0
REASON = "rnnserve-error-reason"
#: Tolerate a live session answered NOT_FOUND on the other replica right after it moved (a
#: holder record written late, fixed: tests/scaleout/test_holder_record_race.py). Off: such an
#: answer is an error of the soak.
HOLDER_RACE = False
#: UNAVAILABLE reasons that mean "not applied, retry shortly" where sessions move.
RETRY_REASONS = ("SESSION_MOVING", "STATE_STORE_UNAVAILABLE")


class Failed(Exception):
    """The lane's action failed in a way the soak does not allow (already recorded)."""


def reason_of(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON, ""))


def describe(error: grpc.aio.AioRpcError) -> str:
    return f"{error.code().name} {reason_of(error)} {error.details()}"


def _result(result: Any) -> str:
    if result.WhichOneof("outcome") == "response":
        return f"position {result.response.position}"
    return f"error {result.error.reason}"


def _brief(reply: Any) -> str:
    """A reply in a trace line: its position, where it has one."""
    for holder in (reply, getattr(reply, "session", None)):
        if holder is not None and hasattr(holder, "position"):
            return f"position {holder.position}"
    return "ok"


@dataclass
class Replica:
    """One server process and its channels."""

    name: str
    server: ServerProcess
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    alive: bool = True  # takes new calls (False once it was told to drain and said so)
    draining: bool = False
    turn: int = 0  # next channel

    def channel(self) -> grpc.aio.Channel:
        self.turn += 1
        return self.channels[self.turn % len(self.channels)]

    async def connect(self) -> None:
        # A local subchannel pool each: separate connections, which SO_REUSEPORT spreads
        # over the frontend processes.
        options = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        self.channels = [
            grpc.aio.insecure_channel(self.server.address, options=options) for _ in range(CHANNELS)
        ]
        for channel in self.channels:
            await channel.channel_ready()

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


@dataclass
class Config:
    alternate: bool = False  # lanes call both replicas in turn
    transient_ok: bool = False  # UNAVAILABLE / CANCELLED are retried (replicas drain)
    store: bool = False  # a state store: move v1 lanes off before v1 retires


class MixedSoak:
    def __init__(
        self, replicas: list[Replica], repository: Path, config: Config, seed: int = 0
    ) -> None:
        self.replicas = replicas
        self.repository = repository
        self.config = config
        self.lanes: list[Lane] = []
        self.stats: Counter[str] = Counter()
        self.errors: list[str] = []
        self.latency: dict[str, list[float]] = {"unary": [], "mux": [], "single": []}
        self.version = "1"  # where new sessions land
        self.retired: set[str] = set()
        self.seed = seed
        self._rngs: dict[int, random.Random] = {}
        self._forks = 0

    # -- plumbing ------------------------------------------------------------------------------
    def error(self, what: str) -> Failed:
        self.errors.append(what)
        return Failed(what)

    def replica(self, track: Track) -> Replica:
        """The replica ``track``'s next call goes to."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            raise self.error("no replica left")
        if not self.config.alternate:
            return live[0]
        track.hops += 1
        return live[track.hops % len(live)]

    def transient(self, error: grpc.aio.AioRpcError, replica: Replica) -> bool:
        """Whether to send the call again (to the next replica); counted by code and reason."""
        return bool(self._why_again(error, replica))

    def _why_again(self, error: grpc.aio.AioRpcError, replica: Replica) -> str:
        """Why to send a call again: "cut" (it may or may not have been applied: a drain, a
        closed connection), "refused" (answered without applying anything: retry), or ""
        (not to be sent again)."""
        code, reason = error.code(), reason_of(error)
        if self.config.alternate and reason == "SESSION_NOT_FOUND" and HOLDER_RACE:
            self.stats["NOT_FOUND for a live session (holder record race), sent again"] += 1
            return "refused"
        if self.config.store and code == grpc.StatusCode.UNAVAILABLE and reason in RETRY_REASONS:
            # "Retry shortly" (the session moving, the store not answering): documented
            # answers a client retries. With Redis up, STATE_STORE_UNAVAILABLE is a known
            # bug (tests/scaleout/test_store_call_burst.py); the summary counts them.
            self.stats[f"retried UNAVAILABLE {reason}"] += 1
            return "refused"
        if not self.config.transient_ok:
            return ""
        # grpc's client says INTERNAL "from Core" for a message written to a stream the
        # draining server has just ended (the call's own status, UNAVAILABLE, comes too late).
        cut = code == grpc.StatusCode.INTERNAL and error.details() == "Internal error from Core"
        if not (code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or cut):
            return ""
        if cut and not replica.draining:
            return ""
        self.stats[f"retried {code.name} {reason or '-'}"] += 1
        if replica.draining and reason != "SESSION_MOVING":
            replica.alive = False  # it said so: the lanes go on through the other
        return "cut"

    async def call(
        self,
        track: Track,
        what: str,
        make: Callable[[Any, Replica], Awaitable[T]],
        done: tuple[grpc.StatusCode, ...] = (),
    ) -> tuple[T | None, bool]:
        """``make(stub, replica)`` until it answers; (reply, whether a try failed before).

        A code in ``done`` after a try was cut means that try was applied (e.g. ALREADY_EXISTS
        for an open sent again): (None, True)."""
        retried = cut = False
        for attempt in range(TRIES):
            replica = self.replica(track)
            track.note(f"{what} -> {replica.name}")
            try:
                reply = await make(stub(replica.channel()), replica)
                track.note(f"{what} <- {replica.name} {_brief(reply)}")
                return reply, retried
            except grpc.aio.AioRpcError as exc:
                track.note(f"{what} <- {replica.name} {describe(exc)}")
                if cut and exc.code() in done:
                    self.stats[f"{what} sent again, done before ({exc.code().name})"] += 1
                    return None, True
                why = self._why_again(exc, replica)
                if not why:
                    raise
                retried = True
                cut = cut or why == "cut"
                await asyncio.sleep(min(0.5, 0.01 * (attempt + 1)))
        raise self.error(f"{what} of {track.session_id}: still failing after {TRIES} tries")

    async def admin(self, replica: Replica, method: str, request: Any) -> Any:
        service = admin_grpc.AdminServiceStub(replica.channel())
        return await getattr(service, method)(request, timeout=CALL_TIMEOUT_S)

    # -- lanes ---------------------------------------------------------------------------------
    async def open_lanes(self, count: int) -> None:
        self.lanes = [Lane(f"lane{i}", i, index=i) for i in range(count)]

        async def one(lane: Lane) -> None:
            reply, _ = await self.call(
                lane,
                "open",
                lambda s, _r: s.OpenSession(
                    pb.OpenSessionRequest(model=MODEL, session_id=lane.session_id),
                    timeout=CALL_TIMEOUT_S,
                ),
            )
            lane.version = reply.session.version

        await asyncio.gather(*(one(lane) for lane in self.lanes))
        self.stats["opens"] += count

    def rng(self, lane: Lane) -> random.Random:
        if lane.index not in self._rngs:
            self._rngs[lane.index] = random.Random(self.seed * 100_003 + lane.index)
        return self._rngs[lane.index]

    async def round(self, active: list[Lane]) -> None:
        """One action of every lane in ``active``, all at once."""
        kinds, weights = list(ACTIONS), list(ACTIONS.values())
        muxed: list[Lane] = []
        others: list[Awaitable[None]] = []
        for lane in active:
            kind = self.rng(lane).choices(kinds, weights)[0]
            if kind == "mux":
                muxed.append(lane)
            else:
                others.append(self._guard(lane, kind, getattr(self, f"_{kind}")(lane)))
        groups: dict[tuple[int, str], list[Lane]] = {}
        for lane in muxed:
            target = self.replica(lane)
            groups.setdefault((lane.index % STREAMS, target.name), []).append(lane)
        streams = [
            self._guard(None, "mux", self._mux(self._named(name), lanes))
            for (_, name), lanes in groups.items()
        ]
        await asyncio.gather(*streams, *others)

    def _named(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    async def _guard(self, lane: Lane | None, kind: str, action: Awaitable[None]) -> None:
        try:
            await action
            self.stats[f"action {kind}"] += 1
        except Failed:
            pass
        except grpc.aio.AioRpcError as exc:
            who = f"lane {lane.index} ({lane.session_id})" if lane is not None else "stream"
            self.errors.append(f"{kind} on {who}: {describe(exc)}")

    # -- steps ---------------------------------------------------------------------------------
    def _check_reply(self, track: Track, expected: int, x: np.ndarray, reply: Any) -> None:
        if reply.position != expected + len(x) or reply.session_id != track.session_id:
            raise self.error(
                f"{track.session_id}: step from {expected} answered position {reply.position} "
                f"of session {reply.session_id!r}"
            )

    def _record(self, track: Track, x: np.ndarray, reply: Any) -> None:
        track.applied(x, to_array(reply.outputs["Y"])[:, 0])  # type: ignore[attr-defined]
        self.stats["steps"] += 1
        self.stats["timesteps"] += len(x)

    async def _step_unary(
        self, track: Track, x: np.ndarray, expected: int, timeout: float = CALL_TIMEOUT_S
    ) -> Any:
        request = step_request(track.session_id, x, expected_position=expected)
        started = time.perf_counter()
        reply, retried = await self.call(
            track, "step", lambda s, _r: s.Step(request, timeout=timeout)
        )
        if not retried:
            self.latency["unary"].append(time.perf_counter() - started)
        self._check_reply(track, expected, x, reply)
        return reply

    async def _resolve(self, track: Track, xs: list[np.ndarray], expected: int) -> None:
        """Steps whose replies never came (a call cut or abandoned): send each again, in
        order, with its ``expected_position``; a step that was applied is answered from its
        stored reply, one that was not is applied now."""
        for x in xs:
            reply = await self._step_unary(track, x, expected)
            self._record(track, x, reply)
            expected += len(x)
            self.stats["steps resent"] += 1

    @staticmethod
    def _draw_x(track: Track, rng: random.Random) -> np.ndarray:
        return track.next_inputs(rng.choice(TIMESTEPS))

    async def _unary(self, lane: Lane) -> None:
        rng = self.rng(lane)
        for _ in range(rng.randint(1, 3)):
            x = self._draw_x(lane, rng)
            reply = await self._step_unary(lane, x, lane.position)
            self._record(lane, x, reply)

    async def _retry(self, lane: Lane) -> None:
        """A step, then the same step again: answered from the stored reply, not applied."""
        rng = self.rng(lane)
        x = self._draw_x(lane, rng)
        expected = lane.position
        if rng.random() < 0.5:
            first = await self._step_unary(lane, x, expected)
            again = await self._step_unary(lane, x, expected)
            self.stats["retries after a reply (unary)"] += 1
            self._same(lane, first, again)
            self._record(lane, x, first)
            return
        # Twice in one stream message: the second is a retry of the first.
        request = step_request(lane.session_id, x, expected_position=expected, request_id="a")
        twice = pb.StreamStepsRequest(steps=[request, request])
        results = await self._stream_once(lane, self.replica(lane), [twice], 2)
        if len(results) == 2 and all(r.WhichOneof("outcome") == "response" for r in results):
            self.stats["retries after a reply (stream)"] += 1
        await self._resolve(lane, self._settle(lane, [(x, expected)] * 2, results), lane.position)

    def _same(self, track: Track, first: Any, again: Any) -> None:
        if again.position != first.position or not np.array_equal(
            to_array(again.outputs["Y"]), to_array(first.outputs["Y"])
        ):
            raise self.error(
                f"{track.session_id}: a retried step was answered position {again.position}, "
                f"not the stored reply (position {first.position})"
            )

    async def _lost(self, lane: Lane) -> None:
        """A step whose reply is lost; the retry with the same expected_position gets it."""
        rng = self.rng(lane)
        x = self._draw_x(lane, rng)
        expected = lane.position
        request = step_request(lane.session_id, x, expected_position=expected)
        replica = self.replica(lane)
        lane.note(f"lost step from {expected} -> {replica.name}")
        if rng.random() < 0.5:
            try:
                await stub(replica.channel()).Step(request, timeout=rng.uniform(0.0005, 0.004))
                self.stats["lost: reply came in time"] += 1
            except grpc.aio.AioRpcError as exc:
                lane.note(f"lost step <- {replica.name} {describe(exc)}")
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED and not self.transient(
                    exc, replica
                ):
                    raise
                self.stats["lost: deadline"] += 1
        else:
            call = stub(replica.channel()).StreamSteps()
            await call.write(pb.StreamStepsRequest(steps=[request]))
            if rng.random() < 0.5:
                await asyncio.sleep(rng.uniform(0, 0.003))
            call.cancel()
            self.stats["lost: stream cancelled"] += 1
        await self._resolve(lane, [x], expected)

    def _step_error_transient(self, track: Track, error: Any) -> bool:
        """Whether a stream step's own error means "not applied, send it again"."""
        if error.reason == "SESSION_NOT_FOUND" and self.config.alternate and HOLDER_RACE:
            self.stats["NOT_FOUND for a live session (holder record race), sent again"] += 1
            return True
        if self.config.store and error.reason in RETRY_REASONS:
            self.stats[f"stream step retried UNAVAILABLE {error.reason}"] += 1
            return True
        if self.config.transient_ok and error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
            self.stats[f"stream step retried UNAVAILABLE {error.reason or '-'}"] += 1
            return True
        return False

    def _settle(
        self, track: Track, planned: list[tuple[np.ndarray, int]], results: list[Any]
    ) -> list[np.ndarray]:
        """Record what a stream answered for ``track``'s ``planned`` steps (inputs, expected
        position), in order; the inputs still to send: not applied (a step that failed
        "retry", the steps behind it, those a cut stream never answered)."""
        failed = False
        last: tuple[int, Any] | None = None  # (expected, reply) of the last step applied here
        for (x, expected), result in zip(planned, results, strict=False):
            if result.WhichOneof("outcome") == "response":
                reply = result.response
                if expected == track.position:
                    self._check_reply(track, expected, x, reply)
                    self._record(track, x, reply)
                    last = (expected, reply)
                elif last is not None and expected == last[0]:
                    self._same(track, last[1], reply)  # a retry: the stored reply
                else:
                    raise self.error(
                        f"{track.session_id}: step from {expected} answered position "
                        f"{reply.position} while at {track.position}"
                    )
                continue
            error = result.error
            if self._step_error_transient(track, error) or (
                failed and error.reason == "POSITION_MISMATCH"
            ):
                failed = True
                continue
            raise self.error(
                f"stream step of {track.session_id}: {error.code} {error.reason} {error.message}"
            )
        todo, at = [], track.position
        for x, expected in planned:
            if expected == at:
                todo.append(x)
                at += len(x)
        return todo

    async def _stream_once(
        self,
        track: Track,
        replica: Replica,
        messages: list[pb.StreamStepsRequest],
        answers: int,
    ) -> list[Any]:
        """Write ``messages`` on one stream (pipelined), read ``answers`` results in order,
        half-close; the results (fewer if a drain cut the stream)."""
        call = stub(replica.channel()).StreamSteps(timeout=CALL_TIMEOUT_S)
        results: list[Any] = []
        track.note(f"stream of {answers} -> {replica.name}")
        try:
            for message in messages:
                await call.write(message)
            while len(results) < answers:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise self.error(f"stream ended after {len(results)} of {answers} results")
                results.extend(reply.results)
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise self.error("stream answered more than it was asked")
        except grpc.aio.AioRpcError as exc:
            track.note(f"stream <- {replica.name} {describe(exc)}")
            if not self.transient(exc, replica):
                raise
        finally:
            call.cancel()
        track.note(f"stream <- {replica.name} {[_result(r) for r in results]}")
        return results

    async def _single(self, lane: Lane) -> None:
        """A stream of the lane's own: 1-4 steps written before any reply is read."""
        rng = self.rng(lane)
        await self._stream_steps(lane, rng.randint(1, 4), rng.random() < 0.5)

    async def _stream_steps(
        self, track: Track, count: int, one_message: bool, release: bool = False
    ) -> bool:
        """``count`` steps on a stream of the track's own; whether the stream applied them
        all (else the rest were sent again, unless the stream closed the session)."""
        rng = self.rng(track) if isinstance(track, Lane) else random.Random(track.session_id)
        expected = track.position
        planned, requests = [], []
        for n in range(count):
            x = self._draw_x(track, rng)
            planned.append((x, expected))
            requests.append(
                step_request(track.session_id, x, expected_position=expected, request_id=str(n))
            )
            expected += len(x)
        if one_message:
            messages = [pb.StreamStepsRequest(steps=requests, close_sessions_on_end=release)]
        else:
            messages = [
                pb.StreamStepsRequest(steps=[r], close_sessions_on_end=release) for r in requests
            ]
        started = time.perf_counter()
        results = await self._stream_once(track, self.replica(track), messages, count)
        if [r.request_id for r in results] != [str(n) for n in range(len(results))]:
            raise self.error(f"{track.session_id}: results out of order")
        todo = self._settle(track, planned, results)
        if not todo:
            self.latency["single"].append(time.perf_counter() - started)
            return True
        if not release:  # a release stream closed the session: nothing to send again
            await self._resolve(track, todo, track.position)
        return False

    async def _mux(self, replica: Replica, lanes: list[Lane]) -> None:
        """Lanes of one group on one stream: 1-3 messages of one step per lane, each
        message's results read before the next is written. A lane whose step failed "retry"
        sends it again on its own and leaves the stream."""
        rng = self.rng(lanes[0])
        call = stub(replica.channel()).StreamSteps(timeout=CALL_TIMEOUT_S)
        pending: dict[str, tuple[Lane, np.ndarray]] = {}
        redo: list[tuple[Lane, np.ndarray]] = []
        try:
            for _ in range(rng.randint(1, 3)):
                planned = {str(lane.index): (lane, self._draw_x(lane, rng)) for lane in lanes}
                steps = [
                    step_request(
                        lane.session_id, x, expected_position=lane.position, request_id=key
                    )
                    for key, (lane, x) in planned.items()
                ]
                started = time.perf_counter()
                for lane, _x in planned.values():
                    lane.note(f"mux step from {lane.position} -> {replica.name}")
                await call.write(pb.StreamStepsRequest(steps=steps))
                pending = dict(planned)
                while pending:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        raise self.error(f"mux stream ended with {len(pending)} unanswered")
                    for result in reply.results:
                        lane, x = pending.pop(result.request_id)
                        lane.note(f"mux <- {replica.name} {_result(result)}")
                        if self._settle(lane, [(x, lane.position)], [result]):
                            redo.append((lane, x))
                self.latency["mux"].append(time.perf_counter() - started)
                if redo:
                    await asyncio.gather(
                        *(self._resolve(lane, [x], lane.position) for lane, x in redo)
                    )
                    lanes = [lane for lane in lanes if all(lane is not r for r, _ in redo)]
                    redo = []
                    if not lanes:
                        break
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise self.error("mux stream answered more than it was asked")
        except grpc.aio.AioRpcError as exc:
            for lane, _ in pending.values():
                lane.note(f"mux <- {replica.name} {describe(exc)}")
            if not self.transient(exc, replica):
                raise
            # Cut by a drain: the unanswered steps go again, each lane on its own.
            await asyncio.gather(
                *(self._resolve(lane, [x], lane.position) for lane, x in [*pending.values(), *redo])
            )
        finally:
            call.cancel()

    # -- session control -----------------------------------------------------------------------
    async def _reset(self, lane: Lane) -> None:
        rng = self.rng(lane)
        state = some_state(lane.key, lane.tick) if rng.random() < 0.5 else None
        request = pb.ResetSessionRequest(
            session_id=lane.session_id,
            state={k: tensor(v) for k, v in (state or {}).items()},
        )
        reply, _ = await self.call(
            lane, "reset", lambda s, _r: s.ResetSession(request, timeout=CALL_TIMEOUT_S)
        )
        if reply.session.position != 0:
            raise self.error(f"{lane.session_id}: reset answered position {reply.session.position}")
        lane.reset(state)
        self.stats["resets"] += 1

    async def _export(self, lane: Lane) -> dict[str, np.ndarray]:
        request = pb.ExportStateRequest(session_id=lane.session_id)
        reply, _ = await self.call(
            lane, "export", lambda s, _r: s.ExportState(request, timeout=CALL_TIMEOUT_S)
        )
        if reply.session.position != lane.position or reply.session.version != lane.version:
            raise self.error(
                f"{lane.session_id}: export at position {reply.session.position} version "
                f"{reply.session.version}, lane at {lane.position} on {lane.version}"
            )
        state = {name: to_array(reply.state[name]) for name in STATE_NAMES}
        segment, step = lane.here()
        lane.exports.append((segment, step, state))
        self.stats["exports"] += 1
        return state

    async def _close(self, track: Track) -> None:
        request = pb.CloseSessionRequest(session_id=track.session_id)
        await self.call(
            track,
            "close",
            lambda s, _r: s.CloseSession(request, timeout=CALL_TIMEOUT_S),
            done=(grpc.StatusCode.NOT_FOUND,),
        )
        self.stats["closes"] += 1

    async def _reopen(self, lane: Lane) -> None:
        """Export, close, open a new session from the exported state (on the newest version)."""
        state = await self._export(lane)
        await self._close(lane)
        lane.opened += 1
        lane.session_id = f"lane{lane.index}.r{lane.opened}"
        request = pb.OpenSessionRequest(
            model=MODEL,
            session_id=lane.session_id,
            initial_state={k: tensor(v) for k, v in state.items()},
            initial_position=lane.position,
        )
        reply, _ = await self.call(
            lane,
            "reopen",
            lambda s, _r: s.OpenSession(request, timeout=CALL_TIMEOUT_S),
            done=(grpc.StatusCode.ALREADY_EXISTS,),
        )
        # None: opened by a try that was cut.
        session = reply.session if reply is not None else (await self._get(lane)).session
        if session.version != self.version or session.position != lane.position:
            raise self.error(
                f"{lane.session_id}: reopened on version {session.version} at position "
                f"{session.position}, want {self.version} at {lane.position}"
            )
        lane.version = session.version
        self.stats["reopens"] += 1
        self.stats["opens"] += 1

    async def _get(self, track: Track) -> Any:
        request = pb.GetSessionRequest(session_id=track.session_id)
        reply, _ = await self.call(
            track, "get", lambda s, _r: s.GetSession(request, timeout=CALL_TIMEOUT_S)
        )
        return reply

    async def _fork(self, lane: Lane) -> None:
        """Fork, step the fork on a branch of inputs of its own, close it; a fork of a lane
        on a retiring version is refused."""
        rng = self.rng(lane)
        self._forks += 1
        fork_id = f"{lane.session_id}.f{self._forks}"
        request = pb.ForkSessionRequest(session_id=lane.session_id, new_session_id=fork_id)
        try:
            reply, _ = await self.call(
                lane,
                "fork",
                lambda s, _r: s.ForkSession(request, timeout=CALL_TIMEOUT_S),
                done=(grpc.StatusCode.ALREADY_EXISTS,),
            )
        except grpc.aio.AioRpcError as exc:
            if lane.version in self.retired and reason_of(exc) == "VERSION_RETIRING":
                self.stats["forks refused (version retiring)"] += 1
                return
            raise
        session = reply.session if reply is not None else None
        if lane.version in self.retired:
            raise self.error(f"{lane.session_id}: forked on retiring version {lane.version}")
        segment, offset = lane.here()
        fork = Fork(
            fork_id,
            1_000_000 + self._forks,
            position=lane.position,
            hops=lane.hops,
            segment=segment,
            offset=offset,
            version=lane.version,
        )
        if session is None:
            session = (await self._get(fork)).session
        if session.position != lane.position or session.version != lane.version:
            raise self.error(
                f"{fork_id}: forked at {session.position} on {session.version}, lane at "
                f"{lane.position} on {lane.version}"
            )
        lane.forks.append(fork)
        self.stats["forks"] += 1
        release = rng.random() < 0.4
        if release:
            if await self._stream_steps(fork, rng.randint(1, 3), rng.random() < 0.5, True):
                self.stats["forks closed by close_sessions_on_end"] += 1
            else:
                # A step was told to retry: not found where the stream ran (the holder
                # record race), so its release may not have found the fork either.
                self.stats["release stream told to retry, fork closed by CloseSession"] += 1
                with contextlib.suppress(grpc.aio.AioRpcError):  # NOT_FOUND: released after all
                    await self._close(fork)
            await self._gone(fork)
            return
        for _ in range(rng.randint(1, 3)):
            x = self._draw_x(fork, rng)
            reply = await self._step_unary(fork, x, fork.position)
            self._record(fork, x, reply)
        await self._close(fork)
        await self._gone(fork)

    async def _gone(self, fork: Fork) -> None:
        """The fork answers NOT_FOUND (closed), within a few seconds for a release."""
        deadline = time.monotonic() + 10
        while True:
            try:
                await self._get(fork)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.stats[f"closed fork: {reason_of(exc)}"] += 1
                    return
                raise
            if time.monotonic() > deadline:
                raise self.error(f"{fork.session_id}: still open after it was closed")
            await asyncio.sleep(0.02)

    async def _move(self, lane: Lane) -> None:
        """AdminService.MoveSession to the newest version (where the lane lives now)."""
        if lane.version == self.version:
            await self._unary(lane)  # nothing to move: step instead
            return
        await self.move(lane)

    async def move(self, lane: Lane) -> None:
        request = admin_pb.MoveSessionRequest(session_id=lane.session_id, version=self.version)
        for _ in range(TRIES):
            replica = self.replica(lane)
            lane.hops -= 1  # the GetSession below goes to the same replica
            try:
                await self._get(lane)  # resident there (brought back if parked or held)
                reply = await self.admin(replica, "MoveSession", request)
            except grpc.aio.AioRpcError as exc:
                busy = exc.code() == grpc.StatusCode.FAILED_PRECONDITION and (
                    reason_of(exc) == "SESSION_BUSY"
                )
                # Parked or called away between the two calls: bring it back again.
                moved_away = self.config.store and exc.code() == grpc.StatusCode.NOT_FOUND
                if busy or moved_away or self.transient(exc, replica):
                    self.stats[f"move tried again ({reason_of(exc) or exc.code().name})"] += 1
                    await asyncio.sleep(0.01)
                    continue
                raise
            if reply.version != self.version or reply.position != lane.position:
                raise self.error(
                    f"{lane.session_id}: moved to {reply.version} at {reply.position}, "
                    f"lane at {lane.position}"
                )
            lane.version = reply.version
            self.stats["moves"] += 1
            return
        raise self.error(f"{lane.session_id}: MoveSession kept failing")

    # -- model versions ------------------------------------------------------------------------
    async def load_version(self, version: str) -> None:
        """Put ``version`` in place (written aside, renamed) and load it on every replica."""
        staging = self.repository / MODEL / f".staging{version}"
        build_lstm(staging / "model.onnx", seed=int(version))
        staging.rename(self.repository / MODEL / version)
        for replica in self.replicas:
            if not replica.alive:
                continue
            reply = await self.admin(
                replica, "LoadModel", admin_pb.LoadModelRequest(model=MODEL, version=version)
            )
            states = [admin_pb.VersionState.Name(v.state) for v in reply.versions]
            if states != ["READY"]:
                raise self.error(f"{replica.name}: LoadModel {version} -> {states}")
        self.version = version
        self.stats["versions loaded"] += 1

    async def retire_version(self, version: str) -> None:
        """Retire ``version`` everywhere. With a state store, its lanes move off it first: a
        replica waits only for the sessions it parked itself, so a lane parked by another
        one would find the version released where it comes back (docs/server.md)."""
        if self.config.store:
            await asyncio.gather(
                *(self.move(lane) for lane in self.lanes if lane.version == version)
            )
        for replica in self.replicas:
            if not replica.alive:
                continue
            await self.admin(
                replica, "RetireModel", admin_pb.RetireModelRequest(model=MODEL, version=version)
            )
        self.retired.add(version)
        self.stats["versions retired"] += 1

    async def version_states(self, replica: Replica) -> dict[str, str]:
        reply = await self.admin(replica, "RepositoryIndex", admin_pb.RepositoryIndexRequest())
        return {
            v.version: admin_pb.VersionState.Name(v.state)
            for v in reply.versions
            if v.model == MODEL
        }

    # -- end -----------------------------------------------------------------------------------
    async def finish(self) -> None:
        """Export every lane's final state and close it."""

        async def one(lane: Lane) -> None:
            try:
                lane.final = await self._export(lane)
                await self._close(lane)
            except Failed:
                pass
            except grpc.aio.AioRpcError as exc:
                self.errors.append(f"finish lane {lane.index}: {describe(exc)}")

        await asyncio.gather(*(one(lane) for lane in self.lanes))

    def traces(self, limit: int = 3) -> str:
        """The traces of the first lanes (and their forks) that an error names."""
        named: list[int] = []
        for error in self.errors:
            for found in re.findall(r"lane(\d+)", error):
                if int(found) not in named:
                    named.append(int(found))
        lines = []
        for index in named[:limit]:
            lane = self.lanes[index]
            merged = sorted(lane.trace + [line for fork in lane.forks for line in fork.trace])
            lines += [f"-- lane {index}", *merged[-150:]]
        return "\n".join(lines)
