"""The rnnserve.v1 InferenceService: request handling at the gRPC boundary.

Handlers validate everything before touching a session, then hand steps to the model's
:class:`~rnnserve.server.batcher.Batcher`. :class:`RnnserveError` becomes a gRPC status with
``ErrorInfo`` (and ``BadRequest`` for a bad field) plus the ``rnnserve-error-reason``
trailer; any other exception is a bug, logged and answered INTERNAL with a fixed message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from . import errors
from .batcher import Batcher
from .config import DTYPES
from .errors import RnnserveError
from .metrics import Metrics
from .parking import Parking
from .repository import ModelVersion, Repository
from .sessions import Session, SessionStore
from .tensors import PROTO_DTYPE, digest, from_array, parse_inputs, parse_state

logger = logging.getLogger(__name__)
Response = TypeVar("Response")
_INTERNAL_MESSAGE = "internal server error; the server log has the details"


def status_trailers(err: RnnserveError) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata for an error: google.rpc.Status details and the reason key."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=errors.DOMAIN))
    details = [info]
    if err.field and err.code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = any_pb2.Any()
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=err.field, description=err.message
        )
        bad.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        details.append(bad)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=details)
    return (
        ("grpc-status-details-bin", status.SerializeToString()),
        (errors.REASON_TRAILER, err.reason),
    )


def as_expected_error(exc: BaseException) -> RnnserveError:
    """Expected errors pass through; anything else is logged and becomes INTERNAL."""
    if isinstance(exc, RnnserveError):
        return exc
    logger.error("event=internal_error", exc_info=exc)
    return RnnserveError(grpc.StatusCode.INTERNAL, errors.INTERNAL, _INTERNAL_MESSAGE)


def _copy_outcome(target: asyncio.Future[Any], source: asyncio.Future[Any]) -> None:
    """Settle ``target`` as ``source`` was settled (a staged step's batch result)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _in_order(previous: asyncio.Future[Any], own: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """A future settled as ``own`` is, but never before ``previous``: the session's results
    on a stream stay in arrival order whichever of its steps finishes first."""
    delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def relay(_own: object) -> None:
        if previous.done():
            _copy_outcome(delivered, own)
        else:
            previous.add_done_callback(lambda _previous: _copy_outcome(delivered, own))

    own.add_done_callback(relay)
    return delivered


def step_error(err: RnnserveError) -> pb.StepError:
    return pb.StepError(code=err.code.value[0], message=err.message, reason=err.reason)


@dataclass
class _Call:
    """What the boundary records about one call for metrics."""

    model: str = ""
    version: str = ""


def describe_model(model: ModelVersion, repository: Repository) -> pb.Model:
    """The public description of a model version (per-session shapes)."""
    config = model.config
    return pb.Model(
        name=model.name,
        version=model.version,
        versions=repository.versions(model.name),
        cell_kind=config.cell_kind,
        inputs=[
            pb.TensorSpec(
                name=t.name,
                dtype=PROTO_DTYPE[t.dtype],
                shape=t.session_shape,
                time_axis=t.session_time_axis,
            )
            for t in config.inputs
        ],
        outputs=[
            pb.TensorSpec(
                name=t.name,
                dtype=PROTO_DTYPE[t.dtype],
                shape=t.session_shape,
                time_axis=t.session_time_axis,
            )
            for t in config.outputs
        ],
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
        metadata=config.metadata,
        providers=model.runner.providers if model.runner else [],
    )


class InferenceService(pb_grpc.InferenceServiceServicer):
    """Implements every rnnserve.v1 method over a repository, a store and batchers."""

    def __init__(
        self,
        repository: Repository,
        store: SessionStore,
        batchers: dict[str, Batcher],
        metrics: Metrics,
        parking: Parking | None = None,
    ) -> None:
        self._repository = repository
        self._store = store
        self._batchers = batchers
        self._metrics = metrics
        self._parking = parking
        self._parks = parking is not None and parking.enabled

    async def _resident(self, session_id: str) -> None:
        """Bring a parked session back before a call touches it (no-op without a store)."""
        if self._parking is not None:
            await self._parking.ensure_resident(session_id)

    # -- boundary ----------------------------------------------------------------------------
    async def _unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handler: Callable[[_Call], Awaitable[Response]],
    ) -> Response:
        call = _Call()
        try:
            response = await handler(call)
        except Exception as exc:  # the boundary: every failure becomes a status
            err = as_expected_error(exc)
            self._metrics.requests.labels(method, call.model, err.code.name).inc()
            await context.abort(err.code, err.message, status_trailers(err))
            raise AssertionError("unreachable") from None  # abort always raises
        self._metrics.requests.labels(method, call.model, "OK").inc()
        return response

    # -- models ------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.ListModelsResponse:
            models = [describe_model(mv, self._repository) for mv in self._repository.all()]
            return pb.ListModelsResponse(models=models)

        return await self._unary("ListModels", context, handle)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.GetModelResponse:
            call.model = request.name
            model = self._repository.get(request.name, request.version)
            return pb.GetModelResponse(model=describe_model(model, self._repository))

        return await self._unary("GetModel", context, handle)

    # -- sessions ----------------------------------------------------------------------------
    async def OpenSession(self, request: pb.OpenSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.OpenSessionResponse:
            call.model = request.model
            model = self._repository.get(request.model, request.version)
            reject_nan = model.config.limits.nan_policy == "reject"
            state = parse_state(
                request.initial_state, model.config.states, "initial_state", reject_nan
            )
            session_id, position = request.session_id, request.initial_position

            def opener(slot: int | None) -> Session:
                return self._store.open(model, session_id, state, position, slot=slot)

            if self._parking is None:
                session = opener(None)
            else:
                session = await self._parking.open(model, session_id, opener)
            return pb.OpenSessionResponse(session=session.describe())

        return await self._unary("OpenSession", context, handle)

    async def GetSession(self, request: pb.GetSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.GetSessionResponse:
            await self._resident(request.session_id)
            session = self._store.get(request.session_id)
            call.model = session.model.name
            return pb.GetSessionResponse(session=session.describe())

        return await self._unary("GetSession", context, handle)

    async def ExportState(self, request: pb.ExportStateRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.ExportStateResponse:
            await self._resident(request.session_id)
            session = self._store.get(request.session_id)
            call.model = session.model.name
            state = {name: from_array(v) for name, v in self._store.export(session).items()}
            return pb.ExportStateResponse(session=session.describe(), state=state)

        return await self._unary("ExportState", context, handle)

    async def ForkSession(self, request: pb.ForkSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.ForkSessionResponse:
            await self._resident(request.session_id)
            source = self._store.get(request.session_id)
            call.model = source.model.name
            new_id = request.new_session_id

            def opener(slot: int | None) -> Session:
                return self._store.fork(request.session_id, new_id, slot=slot)

            if self._parking is None:
                session = opener(None)
            else:
                with self._store.held(source):  # not parked while room is made for the fork
                    session = await self._parking.open(source.model, new_id, opener)
            return pb.ForkSessionResponse(session=session.describe())

        return await self._unary("ForkSession", context, handle)

    async def ResetSession(self, request: pb.ResetSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.ResetSessionResponse:
            await self._resident(request.session_id)
            session = self._store.get(request.session_id)
            call.model = session.model.name
            config = session.model.config
            reject_nan = config.limits.nan_policy == "reject"
            state = parse_state(request.state, config.states, "state", reject_nan)
            session = self._store.reset(request.session_id, state)
            return pb.ResetSessionResponse(session=session.describe())

        return await self._unary("ResetSession", context, handle)

    async def CloseSession(self, request: pb.CloseSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.CloseSessionResponse:
            await self._resident(request.session_id)
            session = self._store.get(request.session_id)
            call.model = session.model.name
            self._store.close(request.session_id)
            return pb.CloseSessionResponse()

        return await self._unary("CloseSession", context, handle)

    # -- inference ---------------------------------------------------------------------------
    def _submit(self, step: pb.StepRequest, call: _Call) -> asyncio.Future[pb.StepResponse]:
        """Validate one step fully, then queue it; raises before any state is touched."""
        session = self._store.get(step.session_id)
        model = session.model
        call.model, call.version = model.name, model.version
        config = model.config
        arrays, timesteps = parse_inputs(
            step.inputs,
            config.inputs,
            {s.input for s in config.states},
            config.limits.max_timesteps,
            config.limits.nan_policy == "reject",
        )
        expected = step.expected_position if step.HasField("expected_position") else None
        return self._batchers[model.key].submit(
            session, arrays, timesteps, digest(step.inputs), expected
        )

    async def Step(self, request: pb.StepRequest, context: Any) -> Any:  # noqa: N802
        started = time.perf_counter()

        async def handle(call: _Call) -> pb.StepResponse:
            await self._resident(request.session_id)
            reply = await self._submit(request, call)
            self._metrics.step_latency.labels(call.model, call.version).observe(
                time.perf_counter() - started
            )
            return reply

        return await self._unary("Step", context, handle)

    async def StreamSteps(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.StreamStepsRequest], context: Any
    ) -> AsyncIterator[pb.StreamStepsResponse]:
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[pb.StepResult | None] = asyncio.Queue()
        tails: dict[str, asyncio.Future[Any]] = {}
        stages: dict[str, asyncio.Task[Any]] = {}
        outstanding = 0
        reading = True

        def settle(step: pb.StepRequest, call: _Call, started: float, fut: asyncio.Future) -> None:
            nonlocal outstanding
            outstanding -= 1
            if tails.get(step.session_id) is fut:
                del tails[step.session_id]
            result = pb.StepResult(request_id=step.request_id, session_id=step.session_id)
            exc = None if fut.cancelled() else fut.exception()
            if fut.cancelled() or exc is not None:
                err = as_expected_error(exc or asyncio.CancelledError())
                result.error.CopyFrom(step_error(err))
                code = err.code.name
            else:
                response = fut.result()
                result.response.CopyFrom(response)
                code = "OK"
                self._metrics.step_latency.labels(call.model, call.version).observe(
                    time.perf_counter() - started
                )
            self._metrics.requests.labels("StreamSteps.step", call.model, code).inc()
            results.put_nowait(result)
            if not reading and outstanding == 0:
                results.put_nowait(None)

        async def stage(
            step: pb.StepRequest, call: _Call, before: asyncio.Task[Any] | None
        ) -> asyncio.Future[pb.StepResponse]:
            """Queue a step once its session is back from the store (and the session's
            earlier staged step is queued), so its steps still run in arrival order."""
            if before is not None:
                await asyncio.wait([before])
            await self._resident(step.session_id)
            return self._submit(step, call)

        def staged(fut: asyncio.Future[Any], task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                fut.set_exception(as_expected_error(asyncio.CancelledError()))
            elif (exc := task.exception()) is not None:
                fut.set_exception(as_expected_error(exc))
            else:
                task.result().add_done_callback(functools.partial(_copy_outcome, fut))

        def accept(step: pb.StepRequest) -> None:
            nonlocal outstanding
            call = _Call()
            started = time.perf_counter()
            sid = step.session_id
            before = stages.get(sid)
            if before is not None and before.done():
                before = None
            if self._parks and (before is not None or not self._store.is_resident(sid)):
                fut: asyncio.Future[Any] = loop.create_future()
                task = loop.create_task(stage(step, call, before))
                stages[sid] = task
                task.add_done_callback(functools.partial(staged, fut))
            else:
                try:
                    fut = self._submit(step, call)
                except Exception as exc:  # answered on the stream, in this session's order
                    fut = loop.create_future()
                    fut.set_exception(as_expected_error(exc))
            previous = tails.get(sid)
            if previous is not None and not previous.done():
                fut = _in_order(previous, fut)
            outstanding += 1
            tails[step.session_id] = fut
            fut.add_done_callback(functools.partial(settle, step, call, started))

        async def read() -> None:
            nonlocal reading
            try:
                async for message in request_iterator:
                    for step in message.steps:
                        accept(step)
            finally:
                reading = False
                if outstanding == 0:
                    results.put_nowait(None)

        reader = loop.create_task(read())
        failure: Exception | None = None
        try:
            while True:
                first = await results.get()
                if first is None:
                    break
                batch = [first]
                done = False
                while not results.empty():
                    item = results.get_nowait()
                    if item is None:
                        done = True
                        break
                    batch.append(item)
                yield pb.StreamStepsResponse(results=batch)
                if done:
                    break
            try:
                await reader
            except Exception as exc:  # a broken request stream ends the call with a status
                failure = exc
        finally:
            if not reader.done():
                reader.cancel()
        if failure is not None:
            err = (
                errors.invalid(f"malformed request message: {failure}")
                if isinstance(failure, DecodeError)
                else as_expected_error(failure)
            )
            self._metrics.requests.labels("StreamSteps", "", err.code.name).inc()
            await context.abort(err.code, err.message, status_trailers(err))
        self._metrics.requests.labels("StreamSteps", "", "OK").inc()

    async def Predict(self, request: pb.PredictRequest, context: Any) -> Any:  # noqa: N802
        async def handle(call: _Call) -> pb.PredictResponse:
            call.model = request.model
            model = self._repository.get(request.model, request.version)
            config = model.config
            reject_nan = config.limits.nan_policy == "reject"
            arrays, _ = parse_inputs(
                request.inputs,
                config.inputs,
                {s.input for s in config.states},
                config.limits.max_timesteps,
                reject_nan,
            )
            state = parse_state(request.initial_state, config.states, "initial_state", reject_nan)
            feeds = {
                spec.name: np.expand_dims(arrays[spec.name], spec.batch_axis)
                for spec in config.inputs
            }
            for spec in config.states:
                value = state.get(spec.input)
                if value is None:
                    value = np.zeros(spec.session_shape, DTYPES[spec.dtype])
                feeds[spec.input] = np.expand_dims(value, spec.batch_axis)
            names = [o.name for o in config.outputs] + [s.output for s in config.states]
            runner = model.runner
            assert runner is not None
            values = await asyncio.get_running_loop().run_in_executor(
                runner.executor, runner.run, names, feeds
            )
            n_out = len(config.outputs)
            return pb.PredictResponse(
                outputs={
                    spec.name: from_array(np.take(v, 0, axis=spec.batch_axis))
                    for spec, v in zip(config.outputs, values[:n_out], strict=True)
                },
                final_state={
                    spec.input: from_array(np.take(v, 0, axis=spec.batch_axis))
                    for spec, v in zip(config.states, values[n_out:], strict=True)
                },
            )

        return await self._unary("Predict", context, handle)
