"""Dynamic batching of steps across sessions, one batcher per model version.

A batch starts as soon as waiting cannot make it larger: when it is full, or when every
session that stepped recently (its *cohort*) already has a step queued. Only while some
recently active session has yet to send its next step does a step wait for it, and never
longer than ``max_queue_delay_us`` -- or ``busy_queue_delay_us`` while the engine's loop is
saturated: then the loop has other work (reading the very calls the batch waits for), so
waiting costs no throughput, and a bigger batch costs less per step (measured on 2 cores,
64 unary callers: batches of 3 steps that each waited out 500 µs, 2.2k steps/s; with the
longer wait when busy, ~20-step batches and 3.4k steps/s). A lone interactive session thus
runs at once, and a crowd of sessions stepping in lockstep is gathered into one run. A batch
that may start the moment its last step is submitted to an idle batcher runs right in that
submit (:meth:`Batcher._start_now`), without a hop to the batcher's task.

A batch takes at most one step per session (a session's later steps stay queued behind its
earlier one, so its order holds) and only steps with the same number of timesteps T. A step
that failed its checks while its session had steps queued or running waits in the queue too,
and is answered in its turn: a session's results leave the engine in the order its steps
came in, whatever happened to each.

One batch is one gather of state rows from the slabs, one onnxruntime run (on the model's
own thread, or inline for runs too short to be worth a thread hop) and one scatter. With
device slabs the run goes through IOBinding and the state rows and new states stay on the
session's device throughout (:mod:`.slabs`): only client inputs and outputs cross to and from
the host. Before
anything is committed the run's outputs are checked (every output's batch extent, every
state's shape) and every reply is built; a failure anywhere up to the commit changes no
session. A run that fails is run again in halves, so a step whose inputs onnxruntime cannot
run (an index out of an embedding's range) fails alone, and the rest of its batch is served.
Steps carry no futures or tasks: replies go to each step's :class:`Sink`, one call per sink
per batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import grpc
import numpy as np

from .. import errors
from ..errors import RnnserveError
from ..metrics import Metrics
from ..repository import ModelVersion
from .checks import ModelChecks
from .slabs import Bound
from .store import Key, Retry, Session, SessionStore

if TYPE_CHECKING:
    from ..runtime import Runner

logger = logging.getLogger(__name__)
_SCAN_WINDOW = 64
#: A session that stepped within this many seconds is expected to step again soon: a
#: closed-loop client's next step follows its reply by a round trip. A session that has stopped
#: stepping holds the others up (by at most the queue delay) for no longer than this.
_COHORT_WINDOW_S = 0.05
#: Runs expected to take less than this (a moving average per batch-size bucket) run on the
#: event loop itself: handing them to the model's thread and back costs about 60 µs, more than
#: such a run. Anything slower (large models, big batches, a GPU) keeps the loop free for gRPC
#: and runs on the model's thread (onnxruntime releases the GIL) -- where there is a core to
#: run it on meanwhile: with two cores or fewer the hop buys no overlap, and every run stays
#: inline (measured on 2 cores, bench LSTM: StreamSteps 64 sessions 3.9k -> 4.9k steps/s,
#: one session 571 -> 678 steps/s; benchmarks/README.md).
#: Runs longer than the second bound (long chunks, a big model) go to the model's thread even
#: there: a hop costs under 1 % of such a run, and while it runs the event loop goes on
#: reading calls (each identity's budgets refuse what is past them, instead of gRPC buffering
#: every call that arrives meanwhile), answering health checks and cancellations.
_INLINE_MAX_RUN_S = 150e-6 if (os.cpu_count() or 1) > 2 else 5e-3
# How long stopping waits for a batch on the model's thread to finish and be answered.
_STOP_WAIT_S = 10.0


@dataclass(slots=True, eq=False)
class Outcome:
    """One step's answer: applied (``position``, ``outputs``) or failed (``error``).

    ``outputs`` maps each output name to the whole batch's output, batch axis first; this
    step's rows are ``outputs[name][row]``. The batch arrays are never written again, and all
    of a batch's outcomes share them, so a reply crossing processes carries each batch once.
    """

    ticket: int
    session_id: str
    position: int = 0
    outputs: dict[str, np.ndarray] | None = None
    error: RnnserveError | None = None
    row: int = 0
    model: str = ""  # the model version's key ("name:version") when the step reached it


class Sink(Protocol):
    """Where a caller's outcomes go: called once per batch with that caller's outcomes.

    A sink may also have ``gone(ticket) -> bool``: True for a step whose caller went away
    (a cancelled call, a stream that ended) before the step ran. Such a step is dropped
    unapplied, as a client that cancelled expects; one already running is applied.
    """

    def __call__(self, outcomes: list[Outcome]) -> None: ...


#: A step waiting for its batch, as a plain tuple (built once per step on the hot path: a
#: tuple costs a fifth of a slotted object), unpacked where it is read:
#: ``(ticket, sink, session, generation, arrays, timesteps, digest, expected, enqueued, key,
#: error)``. ``key`` is the session's turn, (owner, id) as the store keys sessions. A step that
#: failed its checks while its session had steps queued or running waits in its turn with
#: ``error`` set and no ``session``; it is answered, not run.
Queued = tuple[
    int,
    Sink,
    Session | None,
    int,
    dict[str, np.ndarray],
    int,
    bytes | None,
    int | None,
    float,
    Key,
    RnnserveError | None,
]
_SESSION: Final = 2
_TIMESTEPS: Final = 5
_ENQUEUED: Final = 8
_KEY: Final = 9
_ERROR: Final = 10


def failed_in_turn(ticket: int, sink: Sink, key: Key, now: float, error: RnnserveError) -> Queued:
    """A step answered ``error`` once its session's earlier steps are answered."""
    return (ticket, sink, None, 0, {}, 0, None, None, now, key, error)


class LoopLoad:
    """Whether the thread running the batcher (the event loop's) was busy nearly all of the
    last ~100 ms, from its CPU time: the sign that the loop has work queued beside the batch
    (calls to read, replies to write), so a batch may wait longer for its cohort for free."""

    __slots__ = ("_wall", "_cpu", "_busy")
    WINDOW_S = 0.1
    BUSY = 0.85  # share of the window spent on CPU

    def __init__(self) -> None:
        # The first window starts at the first call, on the loop's thread (a batcher may be
        # built on another: a model loaded on a worker thread).
        self._wall = 0.0
        self._cpu = 0.0
        self._busy = False

    def busy(self, now: float) -> bool:
        elapsed = now - self._wall
        if not self._wall:
            self._wall, self._cpu = now, time.thread_time()
        elif elapsed >= self.WINDOW_S:
            cpu = time.thread_time()
            self._busy = cpu - self._cpu >= self.BUSY * elapsed
            self._wall, self._cpu = now, cpu
        return self._busy


Deliveries = dict[int, tuple[Sink, list[Outcome]]]
_enqueued = operator.attrgetter("enqueued")


def deliver(deliveries: Deliveries) -> None:
    """Hand each sink its outcomes; a failing sink (a bug) must not stop the others."""
    for sink, outcomes in deliveries.values():
        try:
            sink(outcomes)
        except Exception:
            logger.exception("event=deliver_failed")


def add(deliveries: Deliveries, sink: Sink, outcome: Outcome) -> None:
    entry = deliveries.get(id(sink))
    if entry is None:
        deliveries[id(sink)] = (sink, [outcome])
    else:
        entry[1].append(outcome)


class Batcher:
    """Queue and run loop of one model version."""

    def __init__(self, model: ModelVersion, store: SessionStore, metrics: Metrics) -> None:
        self.model = model
        self._key = model.key
        self.checks = ModelChecks(model.config)
        self._store = store
        self._slabs = store.slabs(model)
        limits = model.config.limits
        self._max_batch = limits.max_batch_size
        self._max_queue = limits.max_queue_size
        self._delay_s = limits.max_queue_delay_us / 1e6
        self._busy_delay_s = limits.busy_delay_us / 1e6
        self._load = LoopLoad()
        self._queue: deque[Queued] = deque()
        self._wake = asyncio.Event()
        # Session key -> steps of it in the queue; its length is how many sessions are queued.
        self._queued: dict[Key, int] = {}
        self._running: set[Key] = set()
        # Session key -> when it last submitted a step, oldest first: the cohort to wait for.
        self._recent: OrderedDict[Key, float] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # True while the loop waits for work with nothing queued or running: a submit may then
        # start its batch at once (_start_now). False while that batch runs: no nesting.
        self._idle = False
        # True while _gather waits for the batch to fill: a submit then wakes it only when
        # the batch may start (full, or every cohort member queued); its timer covers the rest.
        self._gathering = False
        # Moving average of onnxruntime's time per bucket of batch size and timesteps (powers
        # of two of each, _bucket): one model may serve single steps and long chunks, whose
        # runs differ a thousandfold. Each is "fast" until its first run sets it.
        self._run_s: dict[int, float] = {}
        config = model.config
        self._memory = self._slabs.memory
        self._client_outputs = [o.name for o in config.outputs]
        self._state_outputs = [s.output for s in config.states]
        self._output_names = self._client_outputs + self._state_outputs
        # (name, batch axis, uniform) per input; uniform: every axis but the time axis has a
        # fixed extent (so a batch's arrays, one T, all have one shape) and the batch axis is
        # not the last, so the batch is one concatenate and a free reshape (np.stack costs
        # ~3x more: it expands every array in Python first; measured 28 -> 8 µs at 64).
        self._feed_axes = [
            (
                spec.name,
                spec.batch_axis,
                spec.batch_axis < len(spec.session_shape)
                and all(
                    extent != -1
                    for axis, extent in enumerate(spec.session_shape)
                    if axis != spec.session_time_axis
                ),
            )
            for spec in config.inputs
        ]
        # Whether a step's T fixes every input's shape (no input has a dynamic axis but time):
        # then steps of one T always stack. Else a batch takes only steps of one shape.
        self._shape_bound = all(
            extent != -1
            for spec in config.inputs
            for axis, extent in enumerate(spec.session_shape)
            if axis != spec.session_time_axis
        )
        labels = (model.name, model.version)
        self._m_batch = metrics.batch_size.labels(*labels)
        self._m_delay = metrics.queue_delay.labels(*labels)
        self._m_infer = metrics.inference_time.labels(*labels)
        self._m_starts = {
            reason: metrics.batch_starts.labels(*labels, reason)
            for reason in ("full", "cohort", "delay", "immediate")
        }

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.model.key)

    async def stop(self) -> None:
        """Refuse new steps, answer queued ones SHUTTING_DOWN, let a batch on the model's
        thread finish (up to ``_STOP_WAIT_S``), stop the loop.

        The batch on the thread is left to finish rather than cancelled: the thread computes
        it either way, and cancelling would only drop its answers (its callers would never
        hear) and let the runner close under it.
        """
        self._closed = True
        deliveries: Deliveries = {}
        for ticket, sink, session, *_, key, _error in self._queue:
            if session is not None:
                session.busy -= 1
            add(deliveries, sink, Outcome(ticket, key[1], error=_shutting_down()))
        self._queue.clear()
        self._queued.clear()
        deliver(deliveries)
        give_up = time.monotonic() + _STOP_WAIT_S
        while self._running and time.monotonic() < give_up:
            await asyncio.sleep(0.005)
        if self._running:
            logger.error(
                "event=batch_abandoned model=%s steps=%d waited_s=%s",
                self._key,
                len(self._running),
                _STOP_WAIT_S,
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def depth(self) -> int:
        """Steps in the queue now (the ``queue_depth`` gauge, read when metrics are scraped:
        nothing on the step path, exact between batches)."""
        return len(self._queue)

    def has_work(self) -> bool:
        """Whether any step is queued or running (answers still to come)."""
        return bool(self._queue or self._running)

    def has_steps_of(self, key: Key) -> bool:
        """Whether a step of this session is queued or running (its answer still to come)."""
        return key in self._queued or key in self._running

    def enqueue(self, entries: list[Queued]) -> list[tuple[Queued, RnnserveError]]:
        """Queue checked steps, in order; those refused and to be answered at once.

        A step that finds the queue full is refused RESOURCE_EXHAUSTED: at once when its
        session has no earlier step queued or running, else in its turn behind them. Every
        step is refused SHUTTING_DOWN once the batcher stopped.
        """
        if self._closed:
            error = _shutting_down()
            return [(entry, error) for entry in entries]
        queue, queued, recent = self._queue, self._queued, self._recent
        room = self._max_queue - len(queue)
        refused: list[tuple[Queued, RnnserveError]] = []
        for entry in entries:
            key = entry[_KEY]
            if room <= 0:
                error = self._queue_full()
                if key in queued or key in self._running:
                    queue.append(failed_in_turn(entry[0], entry[1], key, entry[_ENQUEUED], error))
                    queued[key] = queued.get(key, 0) + 1
                else:
                    refused.append((entry, error))
                continue
            room -= 1
            queue.append(entry)
            entry[_SESSION].busy += 1  # type: ignore[union-attr]
            queued[key] = queued.get(key, 0) + 1
            recent[key] = entry[_ENQUEUED]
            recent.move_to_end(key)
        # While gathering, steps that cannot start the batch wake nobody (a wake costs a
        # timer and a task switch per step: measured ~5 % of the server at 64 unary callers).
        # ``recent`` may still hold members past the window, so it is at least the cohort
        # _gather counts: waking on it never wakes too late for "cohort", and the members'
        # expiry is _gather's own timer.
        # Nothing was queued or running before these: a batch that may start now runs here.
        if self._idle and entries and self._start_now(entries[-1][_ENQUEUED]):
            return refused
        if not self._gathering or len(queued) >= self._max_batch or len(queued) >= len(recent):
            self._wake.set()
        return refused

    def _queue_full(self) -> RnnserveError:
        return RnnserveError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            errors.QUEUE_FULL,
            f"model {self.model.key} has {self._max_queue} steps queued; retry later",
        )

    def enqueue_failed(self, entry: Queued) -> None:
        """Queue a failed step (:func:`failed_in_turn`) behind its session's earlier ones
        (never refused)."""
        self._queue.append(entry)
        key = entry[_KEY]
        self._queued[key] = self._queued.get(key, 0) + 1
        self._wake.set()

    def _cohort(self, now: float) -> int:
        """How many sessions stepped within the cohort window (forgetting older ones)."""
        recent, horizon = self._recent, now - _COHORT_WINDOW_S
        while recent:
            sid, seen = next(iter(recent.items()))
            if seen > horizon:
                break
            del recent[sid]
        return len(recent)

    async def _gather(self) -> str:
        """Wait until the batch should start; the reason it starts (a batch_starts label)."""
        if self._delay_s <= 0:
            return "immediate"
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        delay = self._busy_delay_s if self._load.busy(now) else self._delay_s
        deadline = self._queue[0][_ENQUEUED] + delay
        while True:
            now = time.perf_counter()
            if len(self._queued) >= self._max_batch:
                return "full"
            if len(self._queued) >= self._cohort(now):
                return "cohort"
            if now >= deadline:
                return "delay"
            # Woken by the next submit, the deadline, or the oldest cohort member going quiet
            # for the whole window; a timer may fire a little early (uvloop counts in
            # milliseconds), so the loop re-checks and re-arms.
            quiet = next(iter(self._recent.values())) + _COHORT_WINDOW_S
            self._wake.clear()
            timer = loop.call_later(min(deadline, quiet) - now, self._wake.set)
            self._gathering = True
            try:
                await self._wake.wait()
            finally:
                self._gathering = False
                timer.cancel()

    async def _loop(self) -> None:
        while True:
            # One turn of the event loop between batches: a batch that ran inline must not be
            # followed at once by the next (a backlog would starve gRPC I/O, other models'
            # batchers and cancellations until the queue is empty). With nothing queued the
            # wait below is that turn.
            if self._queue:
                await asyncio.sleep(0)
            self._idle = not self._queue
            await self._wake.wait()
            self._idle = False
            self._wake.clear()
            if not self._queue:
                continue
            reason = await self._gather()
            batch = self._take_counted(reason)
            try:
                await self._run(batch)
            except Exception:
                logger.exception("event=batch_failed model=%s", self.model.key)
                self._batch_failed(batch)
            finally:
                self._batch_done(batch)

    def _start_now(self, now: float) -> bool:
        """Run the queue's batch right here, in the submitting caller's turn, if it may start
        at once (see :meth:`enqueue`); whether it ran.

        Measured on 2 cores, one session: the hop to the batcher's task costs ~35 µs of a
        ~750 µs streamed step (a wake-up, a task switch, the gather's checks).
        """
        queued = self._queued
        self._load.busy(now)  # the load window rolls on with batches started here too
        if self._delay_s <= 0:
            reason = "immediate"
        elif len(queued) >= self._max_batch:
            reason = "full"
        elif len(queued) >= self._cohort(now):
            reason = "cohort"
        else:
            return False
        expected_s = self._run_s.get(_bucket(len(queued), self._queue[0][_TIMESTEPS]), 0.0)
        if expected_s >= _INLINE_MAX_RUN_S:
            return False  # a run for the model's thread: the batcher's task awaits it
        self._idle = False  # until the loop waits again; no other batch starts meanwhile
        batch = self._take_counted(reason)
        run = self._run(batch, inline=True)
        try:
            run.send(None)
        except StopIteration:
            pass  # done: an inline batch never waits
        except Exception:
            logger.exception("event=batch_failed model=%s", self.model.key)
            self._batch_failed(batch)
        else:  # not reached: every await in an inline batch's run completes at once
            run.close()
            logger.error("event=batch_suspended model=%s", self.model.key)
            self._batch_failed(batch)
        finally:
            self._batch_done(batch)
            self._idle = not self._queue  # else the loop was woken for the rest
        return True

    def _take_counted(self, reason: str) -> list[Queued]:
        """:meth:`_take`, counting why the batch started."""
        self._m_starts[reason].inc()
        batch = self._take()
        if self._queue:
            self._wake.set()
        return batch

    def _batch_failed(self, batch: list[Queued]) -> None:
        """A bug between take and answer: every step of the batch is answered INTERNAL."""
        deliveries: Deliveries = {}
        for ticket, sink, *_, key, _error in batch:
            add(deliveries, sink, Outcome(ticket, key[1], error=errors.internal()))
        deliver(deliveries)

    def _batch_done(self, batch: list[Queued]) -> None:
        for entry in batch:
            session = entry[_SESSION]
            if session is not None:
                session.busy -= 1
        self._running.clear()

    def _take(self) -> list[Queued]:
        """The next batch: queue order, one step per session, one T (one shape of every
        input, for a model with a dynamic axis besides time), at most max_batch.

        A failed step joins any batch (it is answered, not run). The scan stops after
        ``_SCAN_WINDOW`` steps in a row that could not join, so one session with a long
        backlog costs a bounded scan per batch, not the whole queue.
        """
        queue, queued = self._queue, self._queued
        # The usual case: no session has two steps queued (as many sessions queued as steps)
        # and the first max_batch steps have one T. What the scan below would take, in the
        # same order, without a set and a dict update per step: the whole queue when it fits
        # one batch, else its head (more sessions than a batch holds).
        if len(queued) == len(queue) and self._shape_bound:
            whole = len(queue) <= self._max_batch
            taken = list(queue) if whole else list(itertools.islice(queue, self._max_batch))
            timesteps = None
            for entry in taken:
                if entry[_ERROR] is None:
                    if timesteps is None:
                        timesteps = entry[_TIMESTEPS]
                    elif entry[_TIMESTEPS] != timesteps:
                        break
            else:
                if whole:
                    self._running = set(queued)
                    queued.clear()
                    queue.clear()
                else:
                    self._running = running = {entry[_KEY] for entry in taken}
                    for key in running:
                        del queued[key]
                    popleft = queue.popleft
                    for _ in range(len(taken)):
                        popleft()
                return taken
        taken = []
        rest: deque[Queued] = deque()
        seen: set[Key] = set()
        shape_of = _timesteps_of if self._shape_bound else _shapes_of
        shape = next((shape_of(e) for e in queue if e[_ERROR] is None), None)
        window = max(_SCAN_WINDOW, 2 * self._max_batch)
        max_batch = self._max_batch
        misses = 0
        while queue:
            entry = queue.popleft()
            key = entry[_KEY]
            if key not in seen and (entry[_ERROR] is not None or shape_of(entry) == shape):
                taken.append(entry)
                misses = 0
                left = queued[key] - 1
                if left:
                    queued[key] = left
                else:
                    del queued[key]
            else:
                rest.append(entry)
                misses += 1
            seen.add(key)
            if len(taken) >= max_batch or misses >= window:
                rest.extend(queue)
                queue.clear()
                break
        # Sessions seen but not taken must not block the next scan: only the taken run.
        self._running = {entry[_KEY] for entry in taken}
        self._queue = rest
        return taken

    async def _run(self, batch: list[Queued], inline: bool | None = None) -> None:
        """Answer the steps that cannot run (failed in turn, session changed, position
        mismatch or safe retry, position limit), run the rest as one batch."""
        deliveries: Deliveries = {}
        # The oldest step's wait (one observation per batch, not per step): the batch is in
        # queue order, and the queue in arrival order.
        self._m_delay.observe(time.perf_counter() - batch[0][_ENQUEUED])
        max_position = errors.MAX_POSITION
        ready: list[Queued] = []
        slots: list[int] = []
        # A batch's steps mostly share a few sinks: look ``gone`` up once per run of steps of
        # one sink, not once per step.
        last_sink: Sink | None = None
        gone = None
        for entry in batch:
            ticket, sink, session, generation, _, timesteps, digest, expected, _, key, error = entry
            if sink is not last_sink:
                last_sink = sink
                gone = getattr(sink, "gone", None)
            if gone is not None and gone(ticket):
                continue
            if session is None:
                assert error is not None
                add(deliveries, sink, Outcome(ticket, key[1], error=error))
                continue
            if session.ended or session.generation != generation:
                add(
                    deliveries,
                    sink,
                    Outcome(ticket, key[1], error=_changed(session), model=self._key),
                )
                continue
            if expected is not None and expected != session.position:
                retry = session.retry
                if retry is not None and expected == retry.prev_position and digest == retry.digest:
                    outcome = Outcome(
                        ticket, key[1], retry.position, retry.outputs, None, 0, self._key
                    )
                else:
                    outcome = Outcome(
                        ticket, key[1], error=_position_mismatch(session, expected), model=self._key
                    )
                add(deliveries, sink, outcome)
                continue
            if session.position + timesteps > max_position:
                add(
                    deliveries,
                    sink,
                    Outcome(ticket, key[1], error=_position_limit(session), model=self._key),
                )
                continue
            ready.append(entry)
            slots.append(session.slot)
        if ready:
            try:
                await self._apply(ready, slots, deliveries, inline)
            except Exception:
                # A bug between take and answer: the answers decided stand (a position
                # mismatch keeps its status); each step still without one is answered INTERNAL.
                logger.exception("event=batch_failed model=%s", self._key)
                answered = {
                    (id(sink), outcome.ticket)
                    for sink, outcomes in deliveries.values()
                    for outcome in outcomes
                }
                for ticket, sink, *_, key, _error in ready:
                    if (id(sink), ticket) not in answered:
                        outcome = Outcome(ticket, key[1], error=errors.internal(), model=self._key)
                        add(deliveries, sink, outcome)
        deliver(deliveries)

    def _feeds(self, ready: list[Queued]) -> dict[str, np.ndarray]:
        """The batch's client inputs, each with its batch axis where the model has it."""
        n = len(ready)
        feeds: dict[str, np.ndarray] = {}
        for name, axis, uniform in self._feed_axes:
            if n == 1:  # a lone step: its array with a batch axis of 1, a view
                array = ready[0][4][name]
                feeds[name] = array.reshape((*array.shape[:axis], 1, *array.shape[axis:]))
                continue
            arrays = [entry[4][name] for entry in ready]
            if uniform:  # what np.stack(arrays, axis) gives, in C
                shape = arrays[0].shape
                feeds[name] = np.concatenate(arrays, axis).reshape(
                    (*shape[:axis], n, *shape[axis:])
                )
            else:
                feeds[name] = np.stack(arrays, axis)
        return feeds

    async def _apply(
        self,
        ready: list[Queued],
        slots: list[int],
        deliveries: Deliveries,
        inline: bool | None = None,
    ) -> None:
        """Run ``ready`` (their sessions' ``slots``) as one batch; commit and answer only if
        everything checks out. ``inline``: run on the event loop (True), on the model's
        thread (False), or as the run's expected time says (None)."""
        n = len(ready)
        try:
            feeds = self._feeds(ready)
        except ValueError:  # arrays that do not stack: _take prevents it, halves survive it
            if n == 1:
                raise
            logger.exception("event=batch_not_stacked model=%s steps=%d", self._key, n)
            half = n // 2
            await self._apply(ready[:half], slots[:half], deliveries, inline)
            await self._apply(ready[half:], slots[half:], deliveries, inline)
            return
        bad = self.checks.nonfinite_rows(feeds)
        if bad:  # those steps fail alone, in their turn; the others run without them
            for row, error in bad.items():
                ticket, sink, *_, key, _error = ready[row]
                add(deliveries, sink, Outcome(ticket, key[1], error=error, model=self._key))
            rest = [i for i in range(n) if i not in bad]
            if rest:
                await self._apply(
                    [ready[i] for i in rest], [slots[i] for i in rest], deliveries, inline
                )
            return
        self._m_batch.observe(n)
        bucket = _bucket(n, ready[0][_TIMESTEPS])
        expected_s = self._run_s.get(bucket, 0.0)
        runner = self.model.runner
        assert runner is not None
        slot_array = np.array(slots, np.intp)
        if inline is None:
            inline = expected_s < _INLINE_MAX_RUN_S
        try:
            if inline:
                values, seconds = self.execute(feeds, slot_array)
            else:
                values, seconds = await asyncio.get_running_loop().run_in_executor(
                    runner.executor, self.execute, feeds, slot_array
                )
            outputs, states = self.checks.split(values, n)  # before anything is committed
        except Exception:
            if n == 1:
                ticket, sink, *_, key, _error = ready[0]
                logger.exception("event=run_failed model=%s session=%s", self._key, key[1])
                add(
                    deliveries,
                    sink,
                    Outcome(ticket, key[1], error=errors.internal(), model=self._key),
                )
                return
            # One step's inputs may be what onnxruntime cannot run (an index out of range):
            # run the halves apart, so that step fails alone and nobody else's does.
            half = n // 2
            await self._apply(ready[:half], slots[:half], deliveries, inline)
            await self._apply(ready[half:], slots[half:], deliveries, inline)
            return
        learned = self._run_s.get(bucket)  # the first run of a bucket is its first estimate
        self._run_s[bucket] = seconds if learned is None else learned + 0.2 * (seconds - learned)
        self._m_infer.observe(seconds)
        # A session reset, moved or ended while the run was away on the model's thread is not
        # committed (a run inline gave nothing else a chance to change one).
        changed: set[int] = set()
        if not inline:
            for row, entry in enumerate(ready):
                session = entry[_SESSION]
                assert session is not None
                if session.ended or session.generation != entry[3]:
                    changed.add(row)
        rows = None
        if changed:
            rows = np.array([row for row in range(n) if row not in changed], np.intp)
        self._memory.scatter(slot_array, rows, states)
        # Commit and answer in one pass: nothing below can fail half-way.
        model_key = self._key
        move_to_end = self._slabs.lru.move_to_end
        mono, wall = time.monotonic(), time.time()
        last_sink: Sink | None = None
        answers: list[Outcome] = []
        for row, entry in enumerate(ready):
            ticket, sink, session, _, _, timesteps, digest, expected, _, key, _ = entry
            assert session is not None
            if changed and row in changed:
                outcome = Outcome(ticket, key[1], error=_changed(session), model=self._key)
            else:
                position = session.position + timesteps
                if expected is not None and digest is not None:
                    # Its own rows (copied: a view would keep the whole batch alive).
                    own = {name: value[row : row + 1].copy() for name, value in outputs.items()}
                    session.retry = Retry(session.position, digest, position, own)
                elif session.retry is not None:
                    session.retry = None
                session.position = position
                session.last_use = mono
                session.last_use_time = wall
                move_to_end(key)
                outcome = Outcome(ticket, key[1], position, outputs, None, row, model_key)
            if sink is not last_sink:  # add(), with the last sink's list at hand
                last_sink = sink
                found = deliveries.get(id(sink))
                if found is None:
                    found = deliveries[id(sink)] = (sink, [])
                answers = found[1]
            answers.append(outcome)

    def execute(
        self,
        feeds: dict[str, np.ndarray],
        slots: np.ndarray | None = None,
        runner: Runner | None = None,
    ) -> tuple[list[Bound], float]:
        """Gather the state rows of ``slots``, run onnxruntime once; the values and how long
        that took (no thread hop counted). Runs where the run runs (the model's thread, or
        inline), so a device gather does not hold up the event loop.

        Device slabs' rows run through IOBinding and their new states stay where onnxruntime
        puts them, for the slabs' scatter; host slabs' rows, and Predict (no ``slots``: every
        feed given), run through a plain ``session.run``. ``runner`` is the one the caller
        took when it started (default: the model's now).
        """
        runner = runner or self.model.runner
        assert runner is not None
        started = time.perf_counter()
        values: list[Bound]
        if slots is None:
            values = runner.run(self._output_names, feeds)
        elif self._memory.bound:
            host, device = runner.run_bound(
                feeds, self._memory.gather(slots), self._client_outputs, self._state_outputs
            )
            values = [*host, *device]
        else:
            values = runner.run(self._output_names, {**feeds, **self._memory.gather(slots)})
        return values, time.perf_counter() - started

    async def predict(
        self, arrays: dict[str, np.ndarray], state: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """A stateless whole-sequence run of one sequence, through the same run and checks."""
        runner = self.model.runner
        assert runner is not None
        feeds = self.checks.single_feeds(arrays, state)
        values, seconds = await asyncio.get_running_loop().run_in_executor(
            runner.executor, self.execute, feeds, None, runner
        )
        outputs, states = self.checks.split(values, 1)
        self._m_infer.observe(seconds)  # as a batch's run: once its outputs check out
        return (
            {name: value[0] for name, value in outputs.items()},
            {
                state.input: np.take(states[state.input], 0, axis=state.batch_axis)
                for state in self.model.config.states
            },
        )


def _bucket(steps: int, timesteps: int) -> int:
    """A batch's bucket of expected run time: the powers of two of its size and its steps'
    timesteps (a batch's steps share their timesteps, or nearly: _take)."""
    return steps.bit_length() << 7 | timesteps.bit_length()


def _timesteps_of(entry: Queued) -> object:
    return entry[_TIMESTEPS]


def _shapes_of(entry: Queued) -> object:
    """Every input's shape, in name order: steps that stack into one batch share it."""
    arrays = entry[4]
    assert isinstance(arrays, dict)
    return tuple(sorted((name, array.shape) for name, array in arrays.items()))


def _shutting_down() -> RnnserveError:
    return errors.unavailable(errors.SHUTTING_DOWN, "server is shutting down; retry elsewhere")


def _changed(session: Session) -> RnnserveError:
    if session.ended:
        return errors.ended_meanwhile(session.id, session.ended, "this step")
    return RnnserveError(
        grpc.StatusCode.ABORTED,
        errors.SESSION_CHANGED,
        f"session {session.id!r} was reset (or moved) while this step waited; it was not applied",
        metadata={"session_id": session.id},
    )


def _position_mismatch(session: Session, expected: int) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.FAILED_PRECONDITION,
        errors.POSITION_MISMATCH,
        f"session {session.id!r} is at position {session.position}, step expected {expected}",
        metadata={
            "session_id": session.id,
            "position": str(session.position),
            "expected_position": str(expected),
        },
    )


def _position_limit(session: Session) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.OUT_OF_RANGE,
        errors.POSITION_LIMIT,
        f"session {session.id!r} is at position {session.position}; this step would pass the "
        f"largest position {errors.MAX_POSITION}",
        metadata={"session_id": session.id, "position": str(session.position)},
    )
