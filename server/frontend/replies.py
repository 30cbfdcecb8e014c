"""The per-step metrics of a frontend and the sink of one call (replies: :mod:`.wire`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..engine.batcher import Outcome
from ..metrics import Metrics


class StepMetrics:
    """Counts steps and observes their latency, with the label children cached per model.

    ``count`` takes the time the step was answered (one clock read per delivery, not per
    step); ``flush`` adds the successes counted since the last flush to their counters, one
    increment per model rather than one per step (a coalesced message answers hundreds).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ok: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._pending: dict[Any, int] = {}  # OK counter child -> successes not yet added

    def count(self, method: str, outcome: Outcome, started: float, now: float) -> None:
        model_key = outcome.model
        if outcome.error is not None:
            model = model_key.partition(":")[0]
            self._metrics.requests.labels(method, model, outcome.error.code.name).inc()
            return
        children = self._ok.get((method, model_key))
        if children is None:
            name, _, version = model_key.partition(":")
            children = (
                self._metrics.requests.labels(method, name, "OK"),
                self._metrics.step_latency.labels(name, version),
            )
            self._ok[(method, model_key)] = children
        pending = self._pending
        pending[children[0]] = pending.get(children[0], 0) + 1
        children[1].observe(now - started)

    def flush(self) -> None:
        """Add the successes counted since the last flush to their counters."""
        if self._pending:
            for counter, n in self._pending.items():
                counter.inc(n)
            self._pending.clear()


class CallerSink:
    """The sink of one call (a stream, or one unary Step): delivers outcomes while the call
    lasts; once it has hung up, the engine drops its steps that have not run yet."""

    __slots__ = ("_deliver", "closed")

    def __init__(self, deliver: Callable[[list[Outcome]], None]) -> None:
        self._deliver = deliver
        self.closed = False

    def __call__(self, outcomes: list[Outcome]) -> None:
        self._deliver(outcomes)

    def gone(self, ticket: int) -> bool:
        return self.closed

    def hang_up(self, engine: object, outstanding: bool) -> None:
        """The call ended: its steps still queued (if ``outstanding``) are not to be applied."""
        self.closed = True
        cancel = getattr(engine, "cancel", None)
        if outstanding and cancel is not None:  # the engine is in another process: tell it
            cancel(self)
