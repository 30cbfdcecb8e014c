"""The rnnserve.v1 InferenceService: the gRPC boundary of one frontend.

Handlers are thin: decode protobuf into arrays, call the engine (:class:`.engine_api.EngineApi`)
with the caller's identity, encode the answer. Every failure becomes a status in
:mod:`.status`. The frontend holds no session state: any frontend serves any session.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .. import errors
from ..engine.batcher import Outcome
from ..engine.store import SessionInfo
from ..errors import RnnserveError
from ..metrics import Metrics
from ..repository import ModelVersion, Repository
from .budget import StepBudget
from .drain import Drain
from .engine_api import EngineApi
from .replies import CallerSink, StepMetrics
from .security import current_identity
from .status import abort, as_expected_error
from .stream import UNSENT_BYTES_PER_STREAM, StreamSteps
from .tensors import PROTO_DTYPE, decode, decode_step, digest, encode_map
from .wire import step_response

Response = TypeVar("Response")


def describe_session(info: SessionInfo) -> pb.Session:
    message = pb.Session(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        position=info.position,
    )
    message.create_time.FromNanoseconds(int(info.create_time * 1e9))
    message.last_use_time.FromNanoseconds(int(info.last_use_time * 1e9))
    return message


def describe_model(model: ModelVersion, repository: Repository) -> pb.Model:
    """The public description of a model version (per-session shapes)."""
    config = model.config

    def tensor(t: Any) -> pb.TensorSpec:
        return pb.TensorSpec(
            name=t.name,
            dtype=PROTO_DTYPE[t.dtype],
            shape=t.session_shape,
            time_axis=t.session_time_axis,
        )

    return pb.Model(
        name=model.name,
        version=model.version,
        versions=repository.versions(model.name),
        cell_kind=config.cell_kind,
        inputs=[tensor(t) for t in config.inputs],
        outputs=[tensor(t) for t in config.outputs],
        states=[
            pb.StateSpec(
                name=s.input,
                input=s.input,
                output=s.output,
                dtype=PROTO_DTYPE[s.dtype],
                shape=s.session_shape,
            )
            for s in config.states
        ],
        limits=pb.ModelLimits(
            max_batch_size=config.limits.max_batch_size,
            max_queue_delay_us=config.limits.max_queue_delay_us,
            max_sessions=config.limits.max_sessions,
            idle_timeout_ms=int(config.limits.idle_timeout_s * 1000),
            max_timesteps=config.limits.max_timesteps,
        ),
        metadata={
            **config.metadata,
            "rnnserve.device": model.device,
            "rnnserve.placement": json.dumps(model.placement, sort_keys=True),
        },
        providers=list(model.providers),
    )


class InferenceService(pb_grpc.InferenceServiceServicer):
    """Implements every rnnserve.v1 method over an engine."""

    def __init__(
        self,
        engine: EngineApi,
        metrics: Metrics,
        drain: Drain | None = None,
        stream_idle_s: float | None = None,
        budget: StepBudget | None = None,
        unsent_bytes_per_stream: int = UNSENT_BYTES_PER_STREAM,
    ) -> None:
        """``stream_idle_s``: end a StreamSteps call silent that long with nothing outstanding;
        ``budget``: unanswered steps (and their bytes) per identity, shared by its unary and
        streamed steps; ``unsent_bytes_per_stream``: a StreamSteps call stops being read
        while its results not yet sent pass this (stream.py)."""
        self._engine = engine
        self._metrics = metrics
        self._steps = StepMetrics(metrics)
        self._budget = budget if budget is not None else StepBudget()
        self._stream = StreamSteps(
            engine,
            metrics,
            self._steps,
            drain,
            idle_s=stream_idle_s,
            budget=self._budget,
            unsent_limit=unsent_bytes_per_stream,
        )

    @property
    def _catalogue(self) -> Repository:
        """The engine's current catalogue: versions are loaded and retired while serving."""
        return self._engine.catalogue()

    def _model_label(self, name: str) -> str:
        """A model name as a metric label: only names that exist (no caller-chosen labels)."""
        return name if name in self._catalogue.models else ""

    async def _unary(
        self,
        method: str,
        model: str,
        context: grpc.aio.ServicerContext,
        handle: Callable[[], Awaitable[Response]],
    ) -> Response:
        try:
            response = await handle()
        except Exception as exc:  # the boundary: every failure becomes a status
            err = as_expected_error(exc)
            self._metrics.requests.labels(method, self._model_label(model), err.code.name).inc()
            await abort(context, err)
        self._metrics.requests.labels(method, self._model_label(model), "OK").inc()
        return response

    # -- models ------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.ListModelsResponse:
            catalogue = self._catalogue
            return pb.ListModelsResponse(
                models=[describe_model(mv, catalogue) for mv in catalogue.all()]
            )

        return await self._unary("ListModels", "", context, handle)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.GetModelResponse:
            model = self._catalogue.get(request.name, request.version)
            return pb.GetModelResponse(model=describe_model(model, self._catalogue))

        return await self._unary("GetModel", request.name, context, handle)

    # -- sessions ----------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.OpenSessionResponse:
            info = await self._engine.open_session(
                request.model,
                request.version,
                request.session_id,
                decode(request.initial_state, "initial_state"),
                request.initial_position,
                current_identity(),
            )
            return pb.OpenSessionResponse(session=describe_session(info))

        return await self._unary("OpenSession", request.model, context, handle)

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.GetSessionResponse:
            info = await self._engine.get_session(request.session_id, current_identity())
            return pb.GetSessionResponse(session=describe_session(info))

        return await self._unary("GetSession", "", context, handle)

    async def ExportState(self, request: pb.ExportStateRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.ExportStateResponse:
            info, state = await self._engine.export_state(request.session_id, current_identity())
            return pb.ExportStateResponse(session=describe_session(info), state=encode_map(state))

        return await self._unary("ExportState", "", context, handle)

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.ForkSessionResponse:
            info = await self._engine.fork_session(
                request.session_id, request.new_session_id, current_identity()
            )
            return pb.ForkSessionResponse(session=describe_session(info))

        return await self._unary("ForkSession", "", context, handle)

    async def ResetSession(self, request: pb.ResetSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.ResetSessionResponse:
            info = await self._engine.reset_session(
                request.session_id, decode(request.state, "state"), current_identity()
            )
            return pb.ResetSessionResponse(session=describe_session(info))

        return await self._unary("ResetSession", "", context, handle)

    async def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.CloseSessionResponse:
            await self._engine.close_session(request.session_id, current_identity())
            return pb.CloseSessionResponse()

        return await self._unary("CloseSession", "", context, handle)

    # -- inference ---------------------------------------------------------------------------
    async def Step(self, request: pb.StepRequest, context: Any) -> Any:  # noqa: N802
        started = time.perf_counter()
        expected = request.expected_position if request.HasField("expected_position") else None
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

        def deliver(outcomes: list[Outcome]) -> None:
            if not future.done():
                future.set_result(outcomes[0])

        sink = CallerSink(deliver)
        owner, budget = current_identity(), self._budget
        size = request.ByteSize()  # what the step holds while it waits (budget.py)
        if not budget.admits(owner, size):  # refused at once: no silent backlog
            self._metrics.requests.labels("Step", "", "RESOURCE_EXHAUSTED").inc()
            if budget.used(owner) >= budget.limit:
                await abort(context, errors.steps_quota(budget.limit))
            await abort(
                context, errors.bytes_quota(budget.used_bytes(owner), size, budget.byte_limit)
            )
        budget.take(owner, 1, size)
        try:
            self._engine.submit(
                [
                    (
                        0,
                        request.session_id,
                        decode_step(request.inputs),
                        None if expected is None else digest(request.inputs),
                        expected,
                    )
                ],
                owner,
                sink,
            )
            outcome = await future
        except Exception as exc:  # not an answer from the engine: a bug, INTERNAL (logged)
            err = as_expected_error(exc)
            self._metrics.requests.labels("Step", "", err.code.name).inc()
            await abort(context, err)
        finally:
            sink.hang_up(self._engine, not future.done())  # a cancelled call's step is dropped
            budget.give(owner, 1, size)
        self._steps.count("Step", outcome, started, time.perf_counter())
        self._steps.flush()
        if outcome.error is not None:
            await abort(context, outcome.error)
        return step_response(outcome)  # wire bytes of the StepResponse

    async def StreamSteps(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.StreamStepsRequest], context: Any
    ) -> AsyncIterator[bytes]:
        async for response in self._stream.serve(request_iterator, context, current_identity()):
            yield response

    async def Predict(self, request: pb.PredictRequest, context: Any) -> Any:  # noqa: N802
        async def handle() -> pb.PredictResponse:
            outputs, final_state = await self._engine.predict(
                request.model,
                request.version,
                decode(request.inputs, "inputs"),
                decode(request.initial_state, "initial_state"),
            )
            return pb.PredictResponse(
                outputs=encode_map(outputs), final_state=encode_map(final_state)
            )

        return await self._unary("Predict", request.model, context, handle)


__all__ = ["InferenceService", "RnnserveError", "describe_model", "describe_session"]
