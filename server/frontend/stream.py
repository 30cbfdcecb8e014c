"""StreamSteps: many sessions' steps multiplexed on one bidirectional stream.

The reader decodes each message's steps and hands them to the engine in one call; the engine
answers each session's steps in the order they came (:mod:`rnnserve.server.engine.batcher`),
so this side keeps no ordering machinery: outcomes arrive through one sink per stream, a
batch at a time, and each wake-up of the writer sends everything that is ready as one
message. A step that fails is answered with its own error and the stream goes on; only a
broken request stream ends the call with a status.

Drain: when the server starts to drain, a stream stops reading, answers every step it has
already handed to the engine, and ends with UNAVAILABLE ``DRAINING`` and a ``RetryInfo``, so a
client knows to resume elsewhere rather than seeing a bare cancellation.

Flow control: at most ``max_in_flight`` steps of a stream are unanswered or unsent at once;
past that the reader stops reading, so gRPC's own flow control holds the client back instead
of the server buffering without bound for a client that does not read its replies. Results
are bounded in bytes too (``unsent_limit``, ``--unsent-bytes-per-stream``): a step's result
may be far larger than its request (a long chunk of timesteps answered with all its
outputs), and the identity's budgets are given back as soon as the engine answers, so under
the step bound alone one unread stream could hold 4,096 of the largest results. The reader
stops while the unsent results, with what the steps still unanswered are expected to add
(each the size of the stream's largest result so far, a mean per delivery; until a first
result is seen, the requests' own bytes), pass the bound; it reads on once the client has
read enough. Nothing is dropped or reordered, and a result larger than the whole bound is
still sent: with nothing unsent and nothing unanswered the reader always hands on the next
message.

Idle: with ``idle_s``, a stream that sends no message for that long while none of its steps
is outstanding is ended with DEADLINE_EXCEEDED, so a half-open or abandoned stream does not
hold its call forever. The time counts from its last message or its last results written,
whichever is later: a message answered after longer than ``idle_s`` leaves the client the
whole ``idle_s`` to send its next one. Its sessions stay open; a new stream goes on with them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from rnnserve.v1 import inference_service_pb2 as pb

from .. import errors
from ..engine.batcher import Outcome
from ..engine.core import StepIn
from ..metrics import Metrics
from .budget import StepBudget
from .drain import Drain
from .engine_api import EngineApi
from .replies import CallerSink, StepMetrics
from .status import abort, as_expected_error
from .tensors import decode_step, digest
from .wire import step_result

NOT_FOUND = grpc.StatusCode.NOT_FOUND
MAX_IN_FLIGHT = 4096
#: Default of ``--unsent-bytes-per-stream``: 64 MiB, the largest message a frontend sends
#: (limits.MAX_SEND_BYTES), so a stream can always have a reply of the largest size gRPC would
#: send waiting, and a stream of 1 MiB results keeps 64 steps in flight (a full batch of the
#: usual ``max_batch_size``); far below 4,096 large results.
UNSENT_BYTES_PER_STREAM = 64 << 20
#: The longest session id or request id a step's result echoes (the longest session id).
MAX_ID_CHARS = 128


class StreamSteps:
    """Serves StreamSteps calls over an engine."""

    def __init__(
        self,
        engine: EngineApi,
        metrics: Metrics,
        steps: StepMetrics,
        drain: Drain | None = None,
        max_in_flight: int = MAX_IN_FLIGHT,
        idle_s: float | None = None,
        budget: StepBudget | None = None,
        unsent_limit: int = UNSENT_BYTES_PER_STREAM,
    ) -> None:
        if unsent_limit < 1:
            raise ValueError(f"the bound on unsent bytes must be >= 1, got {unsent_limit}")
        self._unsent_limit = unsent_limit
        self._drain = drain
        self._idle_s = idle_s
        self._budget = budget if budget is not None else StepBudget()
        self._engine = engine
        self._metrics = metrics
        self._steps = steps
        self._max_in_flight = max_in_flight

    async def serve(
        self,
        request_iterator: AsyncIterator[pb.StreamStepsRequest],
        context: Any,
        owner: str,
    ) -> AsyncIterator[bytes]:  # encoded StreamStepsResponse messages (.wire)
        engine, limit = self._engine, self._max_in_flight
        count, flush = self._steps.count, self._steps.flush
        budget, unsent_limit = self._budget, self._unsent_limit
        loop = asyncio.get_running_loop()
        ready: list[bytes] = []  # encoded StreamStepsResponse.results fields
        unsent = 0  # bytes of ``ready`` and of the message being written
        expected = 0  # bytes a result is expected to take: the largest mean of a delivery
        pending = 0  # request bytes of the unanswered steps: the estimate until a result is seen
        wake = asyncio.Event()
        room = asyncio.Event()
        room.set()
        # ticket -> (request_id, arrival, bytes it holds of the identity's byte budget)
        tickets: dict[int, tuple[str, float, int]] = {}
        numbers = itertools.count()
        reading = True
        # Sessions stepped, each with the ticket of its latest step: closed at the end if a
        # message asks. An id whose latest step was answered NOT_FOUND is dropped: the caller
        # has no such session, and keeping every id a stream names would let one stream grow
        # the server without bound (ids of any length, each answered at once).
        stepped: dict[str, int] = {}
        release = False  # a message asked (close_sessions_on_end)
        idle_s = self._idle_s
        last_heard = loop.time()  # when the client last sent a message
        # When a message of results was last written: the stream was busy until then, and is
        # idle only idle_s after both (its last message may take longer than idle_s to answer).
        last_sent = last_heard
        held = False  # waiting for the identity's step budget (not idle)
        # An engine in another process closes the sessions itself (engine_client.py), so they
        # are released even when this process dies before the stream's end is seen there.
        close_on_end = getattr(engine, "close_on_end", None)
        end = getattr(engine, "end", None)
        forget_on_end = getattr(engine, "forget_on_end", None)
        release_later = getattr(engine, "release_later", None)

        def deliver(outcomes: list[Outcome]) -> None:
            nonlocal unsent, expected, pending
            answered = freed = added = 0
            now = time.perf_counter()
            unknown: list[str] = []
            for outcome in outcomes:
                entry = tickets.pop(outcome.ticket, None)
                if entry is None:
                    continue  # the stream has ended; its steps were given back already
                answered += 1
                freed += entry[2]
                count("StreamSteps.step", outcome, entry[1], now)
                result = step_result(outcome, entry[0])
                added += len(result)
                ready.append(result)
                error = outcome.error
                if (
                    error is not None
                    and error.code is NOT_FOUND
                    and stepped.get(outcome.session_id) == outcome.ticket
                ):
                    del stepped[outcome.session_id]
                    unknown.append(outcome.session_id)
            if unknown and release and forget_on_end is not None:
                forget_on_end(sink, unknown)
            if answered:
                unsent += added
                pending -= freed
                if added > expected * answered:
                    expected = added // answered
            flush()
            budget.give(owner, answered, freed)
            wake.set()

        sink = CallerSink(deliver)

        async def read() -> None:
            nonlocal reading, release, last_heard, held
            try:
                async for message in request_iterator:
                    last_heard = loop.time()
                    steps = message.steps
                    start, total = 0, len(steps)
                    size = message.ByteSize()  # what its steps hold while they wait
                    sizes: list[int] | None = None  # each step's, once it goes in pieces
                    # A message is handed to the engine a budget's worth of steps at a time:
                    # one message may hold many thousands of steps (or a few very large
                    # ones), and handed over whole it would pass this identity's budgets
                    # (and this stream's bound) at once.
                    while True:
                        held = True
                        await budget.room(owner)  # this identity's steps elsewhere count too
                        held = False
                        if message.close_sessions_on_end and not release:
                            release = True
                            if close_on_end is not None and stepped:  # earlier messages' too
                                close_on_end(sink, owner, list(stepped))
                        fits = min(budget.limit - budget.used(owner), limit - len(tickets))
                        if not start and (
                            not total
                            or total <= fits - len(ready)
                            and (
                                budget.used_bytes(owner) + size <= budget.byte_limit
                                or (total == 1 and not budget.used(owner))
                            )
                        ):
                            # The usual message, whole: no copy of its steps, no step's size
                            # asked; each step takes an equal share of the message's bytes (a
                            # lone step larger than the byte bound runs when nothing else does).
                            submit(steps, itertools.repeat(size // total if total else 0))
                            start = total
                        else:
                            if sizes is None:
                                sizes = [step.ByteSize() for step in steps]
                            stop = _piece(
                                sizes,
                                start,
                                start + max(1, fits - len(ready)),
                                budget.byte_limit - budget.used_bytes(owner),
                            )
                            if stop == start:  # not even its next step fits the bytes left
                                if budget.used(owner):
                                    held = True
                                    await budget.room(owner, sizes[start])
                                    held = False
                                    continue
                                stop = start + 1  # larger than the whole bound: runs alone
                            submit(steps[start:stop], sizes[start:stop])
                            start = stop
                        if len(tickets) + len(ready) >= limit:
                            room.clear()
                            await room.wait()
                        # Never true with nothing unsent and nothing unanswered: a result
                        # larger than the whole bound is still read, run and sent (alone).
                        while (
                            unsent + (len(tickets) * expected if expected else pending)
                            > unsent_limit
                        ):
                            room.clear()
                            await room.wait()
                        if start >= total:
                            break
            finally:
                reading = False
                wake.set()

        def submit(steps: Any, sizes: Iterable[int]) -> None:
            """Hand ``steps`` (of one message) to the engine, taking them and their ``sizes``
            (bytes, one a step) from the budget."""
            nonlocal pending
            now = time.perf_counter()
            batch: list[StepIn] = []
            fresh: list[str] | None = [] if release and close_on_end is not None else None
            taken = 0
            for step, nbytes in zip(steps, sizes, strict=False):
                ticket = next(numbers)
                taken += nbytes
                # Both ids are echoed in the step's result, which may wait unsent: neither is
                # kept longer than MAX_ID_CHARS (an id that long names no session anyway).
                sid, request_id = step.session_id, step.request_id
                if len(sid) > MAX_ID_CHARS:
                    sid = sid[:MAX_ID_CHARS] + "..."
                inputs = decode_step(step.inputs)
                if len(request_id) > MAX_ID_CHARS:
                    request_id = request_id[:MAX_ID_CHARS] + "..."
                    inputs = _long_request_id()  # answered in its session's turn
                tickets[ticket] = (request_id, now, nbytes)
                if step.HasField("expected_position"):
                    expected = step.expected_position
                    batch.append((ticket, sid, inputs, digest(step.inputs), expected))
                else:
                    batch.append((ticket, sid, inputs, None, None))
                if fresh is not None and sid not in stepped:
                    fresh.append(sid)
                stepped[sid] = ticket
            if fresh and close_on_end is not None:
                close_on_end(sink, owner, fresh)
            if batch:
                budget.take(owner, len(batch), taken)
                pending += taken
                engine.submit(batch, owner, sink)

        reader = loop.create_task(read())
        draining = False
        unlisten = self._drain.listen(wake.set) if self._drain is not None else None
        failure: BaseException | None = None
        idle = False
        timer: asyncio.TimerHandle | None = None
        looked = False  # the idle watchdog fired: look whether the stream is idle

        def quiet() -> bool:
            """Nothing heard for idle_s and nothing of the stream outstanding."""
            assert idle_s is not None
            return (
                reading and not held and not tickets and not ready and room.is_set()
                and loop.time() - max(last_heard, last_sent) >= idle_s
            )  # fmt: skip

        def watchdog() -> None:
            # One timer per stream, re-armed only when it fires (a timeout around every
            # wait cost a timer per message, ~3 % of the server at 256 streams).
            nonlocal timer, looked
            assert idle_s is not None
            if quiet():
                looked = True
                wake.set()
                return
            since = max(last_heard, last_sent)
            timer = loop.call_at(max(since + idle_s, loop.time() + idle_s / 2), watchdog)

        if idle_s is not None:
            timer = loop.call_at(last_heard + idle_s, watchdog)
        try:
            while True:
                await wake.wait()
                wake.clear()
                if looked:
                    looked = False
                    if quiet():
                        idle = True
                        break
                    watchdog()  # heard from meanwhile: watch on
                while ready:  # more may arrive while a message is written
                    message = _next_message(ready, unsent)  # a StreamStepsResponse (.wire)
                    yield message
                    unsent -= len(message)  # written: gRPC's flow control let it go
                    last_sent = loop.time()
                    room.set()
                if not draining and self._drain is not None and self._drain.draining:
                    # Stop reading; the steps the engine already has are still answered.
                    draining = True
                    reader.cancel()
                if (not reading or draining) and not tickets:
                    break
                if not reading and _failed(reader):  # steps read before it stay unanswered
                    break
            if idle and idle_s is not None:
                failure = errors.stream_idle(idle_s, release)
            elif draining:
                failure = self._drain.error() if self._drain is not None else None
            else:
                try:
                    await reader
                except Exception as exc:  # a broken request stream ends the call with a status
                    failure = exc
        finally:
            if timer is not None:
                timer.cancel()
            sink.hang_up(engine, bool(tickets))  # steps of this stream not yet run are dropped
            budget.give(owner, len(tickets), sum(entry[2] for entry in tickets.values()))
            tickets.clear()
            if unlisten is not None:
                unlisten()
            if not reader.done():
                reader.cancel()
            if release:
                # An engine in another process closes them (end), and is told even when none
                # is left to close (every id answered NOT_FOUND): it registered the stream at
                # its first id, and only the end takes it out again, there and in the client.
                if end is not None:
                    end(sink)
                elif release_later is not None and stepped:  # one here: a task of its own
                    release_later(list(stepped), owner)
        if failure is not None:
            err = (
                errors.invalid_request(f"malformed request message: {failure}")
                if isinstance(failure, DecodeError)
                else as_expected_error(failure)
            )
            self._metrics.requests.labels("StreamSteps", "", err.code.name).inc()
            await abort(context, err)
        self._metrics.requests.labels("StreamSteps", "", "OK").inc()


def _piece(sizes: list[int], start: int, most: int, room: int) -> int:
    """The end of the next piece of a message's steps from ``start``: at most up to ``most``
    (the step budget's share) and with ``sizes`` (bytes a step) summing to at most ``room``;
    ``start`` itself when its first step alone does not fit."""
    stop, taken = start, 0
    for stop in range(start, min(most, len(sizes))):
        taken += sizes[stop]
        if taken > room:
            return stop
    return min(most, len(sizes))


def _long_request_id() -> errors.RnnserveError:
    return errors.invalid_request(
        f"request_id is longer than {MAX_ID_CHARS} characters", "request_id"
    )


def _failed(reader: asyncio.Task[None]) -> bool:
    """Whether the stream's reader ended with an error (it ends the call with a status)."""
    return reader.done() and not reader.cancelled() and reader.exception() is not None


#: A response message gathers ready results up to this many bytes (a larger one goes alone):
#: a client reads at most 4 MiB a message unless it asks for more (gRPC's default), and a
#: message past its limit ends the stream for every session on it.
MAX_RESPONSE_BYTES = 1 << 20


def _next_message(ready: list[bytes], total: int) -> bytes:
    """The next response message: results from the front of ``ready`` (taken out of it), at
    least one, under :data:`MAX_RESPONSE_BYTES` together; ``total`` is their bytes (kept by
    the stream, so not summed here)."""
    if total <= MAX_RESPONSE_BYTES:  # the usual case: all of them
        message = b"".join(ready)
        ready.clear()
        return message
    size = count = 0
    for part in ready:
        if count and size + len(part) > MAX_RESPONSE_BYTES:
            break
        size += len(part)
        count += 1
    message = b"".join(ready[:count])
    del ready[:count]
    return message
