"""Engine outcomes to protobuf replies, and the per-step metrics of a frontend."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import tensor_pb2

from ..engine.batcher import Outcome
from ..metrics import Metrics
from .status import step_error
from .tensors import _TO_PROTO

_Tensor = tensor_pb2.Tensor


def _tensor(row: np.ndarray) -> tensor_pb2.Tensor:
    return _Tensor(dtype=_TO_PROTO[row.dtype], shape=row.shape, data=row.tobytes())


def step_response(outcome: Outcome) -> pb.StepResponse:
    """The reply of an applied step (its outputs as this session's rows)."""
    outputs = outcome.outputs or {}
    row = outcome.row
    return pb.StepResponse(
        session_id=outcome.session_id,
        position=outcome.position,
        outputs={name: _tensor(batch[row]) for name, batch in outputs.items()},
    )


def step_result(outcome: Outcome, request_id: str) -> pb.StepResult:
    """One result on a stream: the reply, or the step's own error (the stream goes on)."""
    if outcome.error is not None:
        return pb.StepResult(
            request_id=request_id, session_id=outcome.session_id, error=step_error(outcome.error)
        )
    return pb.StepResult(
        request_id=request_id, session_id=outcome.session_id, response=step_response(outcome)
    )


class StepMetrics:
    """Counts steps and observes their latency, with the label children cached per model."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ok: dict[tuple[str, str], tuple[object, object]] = {}

    def count(self, method: str, outcome: Outcome, started: float) -> None:
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
        children[0].inc()  # type: ignore[attr-defined]
        children[1].observe(time.perf_counter() - started)  # type: ignore[attr-defined]


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
