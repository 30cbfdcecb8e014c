"""Dynamic batching of steps across sessions, one batcher per model version.

A batch starts as soon as waiting cannot make it larger: when it is full, or when every
session that stepped recently (its *cohort*) already has a step queued. Only while some
recently active session has yet to send its next step does a step wait for it, and never
longer than ``max_queue_delay_us``. A lone interactive session thus runs at once, and a crowd
of sessions stepping in lockstep is gathered into one run. A batch takes at most one step per
session (a session's later steps stay queued behind its earlier one, so its order holds) and
only steps with the same number of timesteps T. The batch's state rows are gathered from the
slabs, onnxruntime runs (on the model's own thread, or inline for small fast batches), and the
new state is scattered back only if the run succeeded: a failed run leaves every session of
the batch unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import grpc
import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb

from . import errors
from .errors import RnnserveError
from .metrics import Metrics
from .repository import ModelVersion
from .runtime import Runner
from .sessions import Session, SessionStore
from .tensors import from_array

logger = logging.getLogger(__name__)
_SCAN_WINDOW = 64
#: A session that stepped within this many seconds is expected to step again soon: a
#: closed-loop client's next step follows its reply by a round trip. A session that has stopped
#: stepping holds the others up (by at most the queue delay) for no longer than this.
_COHORT_WINDOW_S = 0.05
#: Batches this small whose runs take less than this (a moving average) run on the event loop
#: itself: handing them to the model's thread and back costs about 60 µs, more than the run.
#: Anything slower (large models, a GPU) keeps the loop free and runs on the model's thread.
_INLINE_MAX_BATCH = 4
_INLINE_MAX_RUN_S = 150e-6


@dataclass(eq=False)
class StepJob:
    """One validated step waiting for its batch."""

    session: Session
    generation: int
    arrays: dict[str, np.ndarray]
    timesteps: int
    digest: bytes
    expected_position: int | None
    future: asyncio.Future[pb.StepResponse]
    enqueued: float


class Batcher:
    """Queue and run loop of one model version."""

    def __init__(self, model: ModelVersion, store: SessionStore, metrics: Metrics) -> None:
        self.model = model
        self._store = store
        self._metrics = metrics
        self._slabs = store.slabs(model)
        limits = model.config.limits
        self._max_batch = limits.max_batch_size
        self._max_queue = limits.max_queue_size
        self._delay_s = limits.max_queue_delay_us / 1e6
        self._queue: deque[StepJob] = deque()
        self._wake = asyncio.Event()
        # Session id -> steps of it in the queue; its length is how many sessions are queued.
        self._queued: dict[str, int] = {}
        # Session id -> when it last submitted a step, oldest first: the cohort to wait for.
        self._recent: OrderedDict[str, float] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Moving average of small batches' onnxruntime time; starts at "fast", the first
        # runs correct it.
        self._small_run_s = 0.0
        config = model.config
        self._output_names = [o.name for o in config.outputs] + [s.output for s in config.states]
        labels = (model.name, model.version)
        self._m_batch = metrics.batch_size.labels(*labels)
        self._m_delay = metrics.queue_delay.labels(*labels)
        self._m_infer = metrics.inference_time.labels(*labels)
        self._m_depth = metrics.queue_depth.labels(*labels)
        self._m_starts = {
            reason: metrics.batch_starts.labels(*labels, reason)
            for reason in ("full", "cohort", "delay", "immediate")
        }

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.model.key)

    async def stop(self) -> None:
        """Refuse new steps, fail queued ones, stop the loop."""
        self._closed = True
        for job in self._queue:
            job.session.pending -= 1
            if not job.future.done():
                job.future.set_exception(_shutting_down())
        self._queue.clear()
        self._queued.clear()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def submit(
        self,
        session: Session,
        arrays: dict[str, np.ndarray],
        timesteps: int,
        digest: bytes,
        expected_position: int | None,
    ) -> asyncio.Future[pb.StepResponse]:
        """Queue a validated step; RESOURCE_EXHAUSTED at once if the queue is full."""
        if self._closed:
            raise _shutting_down()
        if len(self._queue) >= self._max_queue:
            raise RnnserveError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                errors.QUEUE_FULL,
                f"model {self.model.key} has {self._max_queue} steps queued; retry later",
            )
        future: asyncio.Future[pb.StepResponse] = asyncio.get_running_loop().create_future()
        self._queue.append(
            StepJob(
                session,
                session.generation,
                arrays,
                timesteps,
                digest,
                expected_position,
                future,
                time.perf_counter(),
            )
        )
        session.pending += 1
        sid = session.id
        self._queued[sid] = self._queued.get(sid, 0) + 1
        self._recent[sid] = time.perf_counter()
        self._recent.move_to_end(sid)
        self._wake.set()
        return future

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
        deadline = self._queue[0].enqueued + self._delay_s
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
            try:
                await self._wake.wait()
            finally:
                timer.cancel()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                continue
            self._m_starts[await self._gather()].inc()
            batch = self._take()
            self._m_depth.set(len(self._queue))
            if self._queue:
                self._wake.set()
            try:
                await self._run(batch)
            except Exception:
                logger.exception("event=batch_failed model=%s", self.model.key)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(_internal())

    def _take(self) -> list[StepJob]:
        """The next batch: queue order, one step per session, one T, at most max_batch.

        The scan stops after ``_SCAN_WINDOW`` steps in a row that could not join, so one
        session with a long backlog costs a bounded scan per batch, not the whole queue.
        """
        taken: list[StepJob] = []
        rest: deque[StepJob] = deque()
        seen: set[str] = set()
        timesteps = self._queue[0].timesteps
        queue = self._queue
        window = max(_SCAN_WINDOW, 2 * self._max_batch)
        misses = 0
        while queue:
            job = queue.popleft()
            sid = job.session.id
            if job.timesteps == timesteps and sid not in seen:
                taken.append(job)
                misses = 0
                left = self._queued[sid] - 1
                if left:
                    self._queued[sid] = left
                else:
                    del self._queued[sid]
            else:
                rest.append(job)
                misses += 1
            seen.add(sid)
            if len(taken) >= self._max_batch or misses >= window:
                rest.extend(queue)
                queue.clear()
                break
        self._queue = rest
        return taken

    async def _run(self, batch: list[StepJob]) -> None:
        store = self._store
        ready: list[StepJob] = []
        now = time.perf_counter()
        for job in batch:
            job.session.pending -= 1
            self._m_delay.observe(now - job.enqueued)
            if job.future.done():  # the caller went away
                continue
            session = job.session
            if not store.is_live(session, job.generation):
                job.future.set_exception(_changed(session))
                continue
            expected = job.expected_position
            if expected is not None and expected != session.position:
                if (
                    session.last_reply is not None
                    and expected == session.prev_position
                    and job.digest == session.last_digest
                ):
                    job.future.set_result(session.last_reply)
                else:
                    job.future.set_exception(_position_mismatch(session, expected))
                continue
            ready.append(job)
        if not ready:
            return
        config = self.model.config
        slots = np.fromiter((job.session.slot for job in ready), np.intp, len(ready))
        feeds: dict[str, np.ndarray] = {}
        for spec in config.inputs:
            feeds[spec.name] = np.stack([job.arrays[spec.name] for job in ready], spec.batch_axis)
        for state in config.states:
            rows = self._slabs.arrays[state.input][slots]
            feeds[state.input] = np.ascontiguousarray(np.moveaxis(rows, 0, state.batch_axis))
        self._m_batch.observe(len(ready))
        for job in ready:
            job.session.pending += 1
        runner = self.model.runner
        assert runner is not None
        small = len(ready) <= _INLINE_MAX_BATCH
        try:
            if small and self._small_run_s < _INLINE_MAX_RUN_S:
                values, seconds = _timed_run(runner, self._output_names, feeds)
            else:
                values, seconds = await asyncio.get_running_loop().run_in_executor(
                    runner.executor, _timed_run, runner, self._output_names, feeds
                )
        finally:
            for job in ready:
                job.session.pending -= 1
        if small:
            self._small_run_s += 0.2 * (seconds - self._small_run_s)
        self._m_infer.observe(seconds)
        self._finish(ready, slots, values)

    def _finish(self, ready: list[StepJob], slots: np.ndarray, values: list[np.ndarray]) -> None:
        """Scatter the new state of live sessions and answer every step."""
        config = self.model.config
        n_out = len(config.outputs)
        live = [self._store.is_live(job.session, job.generation) for job in ready]
        keep = np.asarray(live, bool)
        for state, value in zip(config.states, values[n_out:], strict=True):
            rows = np.moveaxis(value, state.batch_axis, 0)
            slab = self._slabs.arrays[state.input]
            if keep.all():
                slab[slots] = rows
            else:
                slab[slots[keep]] = rows[keep]
        outputs = [
            (spec.name, np.moveaxis(value, spec.batch_axis, 0))
            for spec, value in zip(config.outputs, values[:n_out], strict=True)
        ]
        for i, job in enumerate(ready):
            session = job.session
            if not live[i]:
                if not job.future.done():
                    job.future.set_exception(_changed(session))
                continue
            before = session.position
            session.position = before + job.timesteps
            reply = pb.StepResponse(
                session_id=session.id,
                position=session.position,
                outputs={name: from_array(rows[i]) for name, rows in outputs},
            )
            session.prev_position = before
            session.last_digest = job.digest
            session.last_reply = reply
            self._store.used(session)
            if not job.future.done():
                job.future.set_result(reply)


def _timed_run(
    runner: Runner, output_names: list[str], feeds: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], float]:
    """One onnxruntime run and how long onnxruntime itself took (no thread hop counted)."""
    started = time.perf_counter()
    values = runner.run(output_names, feeds)
    return values, time.perf_counter() - started


def _shutting_down() -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.UNAVAILABLE, errors.SHUTTING_DOWN, "server is shutting down"
    )


def _internal() -> RnnserveError:
    return RnnserveError(grpc.StatusCode.INTERNAL, errors.INTERNAL, "internal error")


def _changed(session: Session) -> RnnserveError:
    if session.closed:
        return RnnserveError(
            grpc.StatusCode.NOT_FOUND,
            session.end_reason or errors.SESSION_CLOSED,
            f"session {session.id!r} ended while this step waited",
        )
    return RnnserveError(
        grpc.StatusCode.ABORTED,
        errors.SESSION_CHANGED,
        f"session {session.id!r} was reset while this step waited; it was not applied",
    )


def _position_mismatch(session: Session, expected: int) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.FAILED_PRECONDITION,
        errors.POSITION_MISMATCH,
        f"session {session.id!r} is at position {session.position}, step expected {expected}",
    )
