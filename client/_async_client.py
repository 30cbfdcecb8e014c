"""The asyncio client: the one implementation every other entry point runs on."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc
import numpy.typing as npt
from rnnserve.v1 import error_reason_pb2
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from ._exceptions import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidInput,
    RnnserveError,
    SessionNotFound,
    Unavailable,
    error_from_rpc,
)
from ._inputs import Output, decode_outputs, encode_inputs, encode_state
from ._models import ExportedState, ModelInfo, Prediction, SessionInfo
from ._options import ClientOptions
from ._stream import MAX_MESSAGE_BYTES, AsyncStepStream
from ._tensors import from_tensor_map

_Response = TypeVar("_Response")
_RETRYABLE = (Unavailable, DeadlineExceeded)
#: The UNAVAILABLE reasons with which the server turns a call away before doing any of it:
#: a try answered so certainly changed nothing. Any other UNAVAILABLE or DEADLINE_EXCEEDED
#: (a lost connection, a proxy's answer, an engine that died mid-call) may have been applied.
_REFUSED = frozenset(
    error_reason_pb2.ErrorReason.Name(reason)
    for reason in (
        error_reason_pb2.DRAINING,
        error_reason_pb2.SESSION_MOVING,
        error_reason_pb2.STATE_STORE_UNAVAILABLE,
    )
)
#: What ``_call`` hands an error when an earlier try may have been applied: the reply that
#: try would have given, or None when the error stands.
_Settle = Callable[[RnnserveError, float | None], Awaitable[Any]]


class AsyncClient:
    """A connection to an rnnserve server.

    Use it as ``async with AsyncClient("127.0.0.1:50051") as client:``; it owns one gRPC
    channel, shared by every session it opens and every stream it starts. The channel opens
    at the first call and belongs to that call's event loop: use a client from one loop only.

    Every unary call is retried after UNAVAILABLE or DEADLINE_EXCEEDED (``ClientOptions``
    says how often, how long it waits and how ``timeout`` bounds it), because each is safe
    to repeat, even when the lost try was applied and only its reply went missing:

    - reads (``list_models``, ``get_model``, ``session``, ``refresh``, ``export_state``) and
      ``predict`` change nothing;
    - a step carries ``expected_position``: a repeat is answered from the stored reply;
    - ``open_session`` and ``fork`` always name the new session (a random 32-hex-digit id,
      the server's own format, when the caller gives none), so a repeat cannot open a second
      one; a repeat answered ALREADY_EXISTS after a try that may have been applied takes
      the session if it is exactly what was asked for (model, version if given, position,
      state) and was never used since it was opened, else raises ``AlreadyExists``;
    - a ``close`` repeated after such a try that finds the session gone (NOT_FOUND) is done;
    - ``reset`` sets the state and position, so a repeat changes nothing more.

    The streams of ``stream`` and ``AsyncSession.steps`` are never retried.

    Model descriptions (``GetModel``) are read once per version and cached: inputs are
    encoded from them (names, dtypes). Calls without a version reach the highest READY
    version, which loading or retiring a version changes: ``open_session`` learns it from
    the server's reply, and a call refused for inputs that fit another version reads the
    description again and is made once more if the version changed (see ``_on_current``).
    """

    def __init__(self, target: str, *, options: ClientOptions | None = None) -> None:
        self.options = options if options is not None else ClientOptions()
        self.target = target
        self._channel: grpc.aio.Channel | None = None
        self._service: pb_grpc.InferenceServiceStub | None = None
        #: Model descriptions by (name, version), versions as the server names them ("2").
        self._models: dict[tuple[str, str], ModelInfo] = {}
        #: The version each model's calls without one last reached (its highest READY one).
        self._highest: dict[str, str] = {}
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; sessions stay open on the server until closed or expired.

        Calls in flight raise ``Unavailable``, and so do steps waiting on a stream; a call
        made afterwards raises ``RuntimeError``."""
        self._closed = True
        if self._channel is not None:
            await self._channel.close()

    @property
    def _stub(self) -> pb_grpc.InferenceServiceStub:
        """The service stub; its channel opens on first use, inside the loop that uses it."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._service is None:
            self._channel = self.options.open_channel(self.target)
            self._service = pb_grpc.InferenceServiceStub(self._channel)
        return self._service

    async def list_models(self) -> list[ModelInfo]:
        """Every loaded model version, sorted by name then version."""
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [ModelInfo.from_proto(model) for model in response.models]

    async def get_model(self, name: str, version: str = "") -> ModelInfo:
        """One model version (the highest when ``version`` is empty), read from the server."""
        return await self._get_model(name, version, None)

    async def _get_model(self, name: str, version: str, deadline: float | None) -> ModelInfo:
        """Read a description from the server and cache it under the version it describes
        (and, asked without a version, as the one calls without a version now reach)."""
        request = pb.GetModelRequest(name=name, version=version)
        response = await self._call(self._stub.GetModel, request, deadline=deadline)
        info = ModelInfo.from_proto(response.model)
        self._models[(info.name, info.version)] = info
        if not version:
            self._highest[name] = info.version
        return info

    async def open_session(
        self,
        model: str,
        *,
        version: str = "",
        session_id: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | ExportedState | None = None,
        initial_position: int | None = None,
    ) -> AsyncSession:
        """Open a session, from zero state or from ``initial_state``.

        An ``ExportedState`` brings its own position (unless ``initial_position`` is given),
        so a session exported elsewhere continues exactly where it was. Without a
        ``session_id`` the SDK makes one (32 random hexadecimal digits, as the server would):
        a retried open then cannot open two sessions, and a proxy that routes by the session
        header routes the open where the session's later calls go. ``AlreadyExists`` if the
        id is taken (see the class docstring for a retry that finds it taken).
        """
        deadline = self._deadline()  # one for the model's description, the open and its check
        if isinstance(initial_state, ExportedState):
            state: Mapping[str, npt.ArrayLike] | None = initial_state.state
            position = initial_state.position if initial_position is None else initial_position
        else:
            state, position = initial_state, initial_position or 0
        session_id = session_id or _new_session_id()

        async def open_on(info: ModelInfo) -> pb.OpenSessionResponse:
            request = pb.OpenSessionRequest(
                model=model,
                version=version,
                session_id=session_id,
                initial_state=encode_state(info, state),
                initial_position=position,
            )

            async def settle(
                error: RnnserveError, deadline: float | None
            ) -> pb.OpenSessionResponse | None:
                if not isinstance(error, AlreadyExists):
                    return None
                found = await self._untouched(
                    session_id,
                    deadline,
                    model=model,
                    version=version,
                    position=position,
                    state=from_tensor_map(request.initial_state),
                )
                return None if found is None else pb.OpenSessionResponse(session=found)

            return await self._call(
                self._stub.OpenSession,
                request,
                session_id=session_id,
                settle=settle,
                deadline=deadline,
            )

        response = await self._on_current(model, version, deadline, open_on)
        if not version:  # the server names the version it chose: the highest READY one now
            self._highest[model] = response.session.version
        return await self._session(SessionInfo.from_proto(response.session), deadline)

    async def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (e.g. one opened by another process)."""
        request = pb.GetSessionRequest(session_id=session_id)
        deadline = self._deadline()
        response = await self._call(
            self._stub.GetSession, request, session_id=session_id, deadline=deadline
        )
        return await self._session(SessionInfo.from_proto(response.session), deadline)

    async def predict(
        self,
        model: str,
        x: npt.ArrayLike | None = None,
        /,
        *,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
        **named: npt.ArrayLike,
    ) -> Prediction:
        """Run one whole sequence without a session; returns outputs and final state."""
        deadline = self._deadline()

        async def predict_on(info: ModelInfo) -> pb.PredictResponse:
            request = pb.PredictRequest(
                model=model,
                version=version,
                inputs=encode_inputs(info, x, named),
                initial_state=encode_state(info, initial_state),
            )
            return await self._call(self._stub.Predict, request, deadline=deadline)

        response = await self._on_current(model, version, deadline, predict_on)
        return Prediction(
            outputs=from_tensor_map(response.outputs),
            final_state=from_tensor_map(response.final_state),
        )

    def stream(
        self,
        *,
        affinity: str = "",
        max_steps_per_message: int = 512,
        close_sessions_on_end: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> AsyncStepStream:
        """One StreamSteps call on which steps of many sessions are multiplexed.

        Use as ``async with client.stream() as stream: await stream.step(session, x)``.
        Steps submitted in the same event-loop tick (or while the previous message is being
        written) travel in one message. Behind a proxy that routes by session, a stream reaches
        one replica: pass ``affinity`` (a session id) to choose which, and put only sessions
        living on that replica on the stream. ``close_sessions_on_end``: the server closes every
        session stepped on the stream when the stream ends, however it ends (release on
        disconnect). A message carries at most ``max_steps_per_message`` steps and stops
        short of ``max_message_bytes`` (a larger step goes alone), under the server's limit.
        """
        return AsyncStepStream(
            self,
            affinity=affinity,
            max_steps_per_message=max_steps_per_message,
            close_sessions_on_end=close_sessions_on_end,
            max_message_bytes=max_message_bytes,
        )

    def _deadline(self) -> float | None:
        """The loop time by which an SDK call starting now must end (``options.timeout``):
        one for every request the call makes, a model's first description included."""
        if self.options.timeout is None:
            return None
        return asyncio.get_running_loop().time() + self.options.timeout

    async def _model(self, name: str, version: str, deadline: float | None) -> ModelInfo:
        """Model info from the cache, asking the server the first time. Without a version:
        the description of the version such calls last reached (see ``_on_current``)."""
        cached = self._models.get((name, version or self._highest.get(name, "")))
        if cached is not None:
            return cached
        return await self._get_model(name, version, deadline)

    async def _on_current(
        self,
        name: str,
        version: str,
        deadline: float | None,
        call: Callable[[ModelInfo], Awaitable[_Response]],
    ) -> _Response:
        """``call`` made with the inputs encoded for the version the server serves it on.

        A call without a version reaches the highest READY version, which a version loaded
        (or retired) since the cached description was read changes. Inputs are encoded from
        the description by name and dtype only, so one encoded for the wrong version is
        refused (by the SDK: an unknown name, a dtype that does not fit; or by the server:
        INVALID_TENSOR); then the description is read again, and if it names another
        version the call is made once more, encoded for it. One read per such refusal, none
        while the cache is right.
        """
        info = await self._model(name, version, deadline)
        try:
            return await call(info)
        except InvalidInput as error:
            if version or not _may_be_stale(error):
                raise
            try:
                current = await self._get_model(name, "", deadline)
            except RnnserveError:
                current = info
            if current.version == info.version:
                raise
        return await call(current)

    async def _session(self, info: SessionInfo, deadline: float | None) -> AsyncSession:
        return AsyncSession(self, info, await self._model(info.model, info.version, deadline))

    async def _untouched(
        self,
        session_id: str,
        deadline: float | None,
        *,
        model: str,
        version: str,
        position: int,
        state: Mapping[str, npt.NDArray[Any]],
    ) -> pb.Session | None:
        """The session ``session_id`` if it is exactly what a lost open (or fork) made: of
        ``model`` (and ``version``, when given) at ``position``, never stepped or reset since it
        was opened, its state bit for bit ``state`` (pairs left out: zeros); else None."""
        request = pb.ExportStateRequest(session_id=session_id)
        try:
            exported = await self._call(
                self._stub.ExportState, request, session_id=session_id, deadline=deadline
            )
        except RnnserveError:
            return None
        found = exported.session
        if (
            found.model != model
            or (version and found.version != version)
            or found.position != position
            or found.create_time != found.last_use_time
        ):
            return None
        have = from_tensor_map(exported.state)
        if set(state) - set(have):
            return None
        for name, value in have.items():
            want = state.get(name)
            if want is None:
                if value.any():
                    return None
            elif (want.dtype, want.shape, want.tobytes()) != (
                value.dtype,
                value.shape,
                value.tobytes(),
            ):
                return None
        return found

    async def _call(
        self,
        method: Callable[..., Awaitable[_Response]],
        request: Any,
        *,
        session_id: str = "",
        settle: _Settle | None = None,
        deadline: float | None = None,
    ) -> _Response:
        """One unary call: deadline, metadata, error mapping and retries.

        ``options.timeout`` bounds the whole call (``deadline``, a loop time, when a caller
        already holds one): each try gets what is left of it. A try that fails UNAVAILABLE or
        DEADLINE_EXCEEDED is repeated after ``options.retry_delay`` (the SDK's backoff, or
        the server's RetryInfo delay if longer), unless that wait would end past the
        deadline. Once a try failed in a way that may have applied it (anything but the
        server's refusals, ``_REFUSED``), a later try's other error goes to ``settle``, which
        returns the reply of the applied try, or None to raise the error.
        """
        options = self.options
        attempts = options.retries + 1
        metadata = options.call_metadata(session_id)
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = self._deadline()
        maybe_applied = False
        for attempt in range(attempts):
            timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
            try:
                return await method(request, timeout=timeout, metadata=metadata)
            except asyncio.CancelledError:
                if not self._closed:
                    raise  # the caller's own task was cancelled
                raise Unavailable("the client was closed while this call was in flight") from None
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not isinstance(error, _RETRYABLE):
                    if maybe_applied and settle is not None:
                        settled = await settle(error, deadline)
                        if settled is not None:
                            return cast(_Response, settled)
                    raise error from exc
                maybe_applied = maybe_applied or error.reason not in _REFUSED
                if attempt + 1 >= attempts:
                    raise error from exc
                delay = options.retry_delay(attempt, error.retry_after)
                if deadline is not None and loop.time() + delay >= deadline:
                    raise error from exc  # no try could start before the deadline
            await asyncio.sleep(delay)
            if self._closed:  # closed during the wait: the next try has no channel to go on
                raise Unavailable("the client was closed while this call was in flight")
        raise AssertionError("unreachable: the last attempt returns or raises")


class AsyncSession:
    """A server-side session: its recurrent state lives on the server between steps.

    Steps through ``step`` are serialised per session and carry ``expected_position``, so a
    retry after a lost reply is answered from the server's stored reply, never applied twice.
    The calls that read or set the position (``refresh``, ``export_state``, ``fork``,
    ``reset``) wait for a step in flight, and a step for them.

    ``position`` only grows, whatever order replies arrive in (a step's reply on a stream
    can arrive after a later step's, on another stream or unary): the server applies one
    session's steps one after another, so the highest position reported is the latest. Only
    ``reset`` sets it back, once the steps this handle streamed before it are answered;
    replies of steps streamed while a reset is under way, arriving after it, are not
    counted. ``refresh`` and ``export_state`` set it to what they read
    when none of this handle's streamed steps is unanswered (a session reset elsewhere), and
    count what they read like a step's reply otherwise.

    ``model`` describes the version the session is on, as last reported: a reply naming
    another version (``refresh``, ``export_state``, ``reset``; the session was moved with
    MoveSession) makes the handle take up that version's description, and a ``step``
    refused for inputs that do not fit re-reads the session's version and, if it changed,
    is encoded for the new version and sent again.
    """

    def __init__(self, client: AsyncClient, info: SessionInfo, model: ModelInfo) -> None:
        self._client = client
        self._info = info
        self.model = model
        self._position = info.position
        self._closed = False
        self._lock = asyncio.Lock()
        self._epoch = 0  # resets through this handle; a streamed step's reply counts in its own
        self._streamed = 0  # this handle's streamed steps not answered yet
        self._submitted = 0  # this handle's steps ever streamed
        #: Ordinals (0, 1, ...: the order streamed) of this handle's unanswered streamed steps.
        self._unanswered: set[int] = set()
        self._answer: asyncio.Event | None = None  # set at the next answer, for ``_quiesce``

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._info.session_id

    @property
    def position(self) -> int:
        """Timesteps consumed, as of the latest step the server reported applying (replies
        arriving out of order never move it back; ``reset`` sets it)."""
        return self._position

    @property
    def closed(self) -> bool:
        """Whether this handle closed the session."""
        return self._closed

    def __repr__(self) -> str:
        model = f"{self.model.name}:{self.model.version}"
        return f"<AsyncSession {self.session_id} {model} @{self._position}>"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._closed:
            await self.close()

    async def step(self, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike) -> Output:
        """Advance by the T timesteps in ``x`` (shape (T, ...)); returns those outputs.

        A model with one output gives an array, one with several a dict by output name.
        Inputs refused as not fitting (by the SDK or the server) make the handle re-read the
        session's version once: if the session was moved to another version, the step is
        encoded for that version and sent again.
        """
        async with self._lock:
            try:
                response = await self._step(x, named)
            except InvalidInput as error:
                if not _may_be_stale(error) or not await self._moved():
                    raise
                response = await self._step(x, named)
            self._advance(response.position)
        return decode_outputs(response.outputs)

    async def _step(
        self, x: npt.ArrayLike | None, named: Mapping[str, npt.ArrayLike]
    ) -> pb.StepResponse:
        request = pb.StepRequest(
            session_id=self.session_id,
            inputs=encode_inputs(self.model, x, named),
            expected_position=self._position,
        )
        return await self._client._call(
            self._client._stub.Step, request, session_id=self.session_id
        )

    async def _moved(self) -> bool:
        """Re-read the session; whether it is on another version than ``model`` said (the
        handle then takes up that version's description)."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        before = self.model.version
        try:
            response = await self._client._call(
                self._client._stub.GetSession, request, session_id=self.session_id
            )
            self._info = SessionInfo.from_proto(response.session)
            await self._take_up(response.session)
        except RnnserveError:
            return False
        return self.model.version != before

    async def _take_up(self, session: pb.Session) -> None:
        """Take up the description of the version a reply names, if not the one held."""
        if session.version and session.version != self.model.version:
            self.model = await self._client._model(session.model, session.version, None)

    async def steps(
        self,
        inputs: Iterable[npt.ArrayLike] | AsyncIterable[npt.ArrayLike],
        *,
        window: int = 32,
    ) -> AsyncGenerator[Output, None]:
        """Stream many steps over one StreamSteps call, yielding outputs in order.

        Up to ``window`` steps are in flight at once, so the round-trip is paid once, not
        per step. Stopping early abandons steps already sent (``refresh`` re-reads position).
        """
        if window < 1:
            raise ValueError("window must be >= 1")
        async with self._client.stream(affinity=self.session_id) as stream:
            pending: collections.deque[asyncio.Future[Output]] = collections.deque()
            try:
                async for x in _aiter(inputs):
                    pending.append(stream.submit(self, x))
                    if len(pending) >= window:
                        yield await pending.popleft()
                while pending:
                    yield await pending.popleft()
            finally:
                # Steps left unread (the caller stopped early, or an earlier step failed):
                # their outcomes are nobody's, so none is left for asyncio to log as an
                # exception never retrieved.
                for future in pending:
                    if not future.cancel() and not future.cancelled():
                        future.exception()

    async def refresh(self) -> SessionInfo:
        """Re-read the session from the server (position, timestamps)."""
        request = pb.GetSessionRequest(session_id=self.session_id)
        # Not beside a step of this handle: a reply read before the step was applied but
        # arriving after it would set the position back, and the next step would expect
        # the old one (with the same inputs, answered from the stored reply, not applied).
        async with self._lock:
            quiet, submitted = self._streamed == 0, self._submitted
            response = await self._client._call(
                self._client._stub.GetSession, request, session_id=self.session_id
            )
            self._info = SessionInfo.from_proto(response.session)
            self._read(self._info.position, quiet and submitted == self._submitted)
            await self._take_up(response.session)
        return self._info

    async def export_state(self) -> ExportedState:
        """The session's state tensors and position, to open it elsewhere or later."""
        request = pb.ExportStateRequest(session_id=self.session_id)
        async with self._lock:  # not beside a step of this handle, as in refresh
            quiet, submitted = self._streamed == 0, self._submitted
            response = await self._client._call(
                self._client._stub.ExportState, request, session_id=self.session_id
            )
            exported = ExportedState.from_proto(response)
            self._read(exported.position, quiet and submitted == self._submitted)
            await self._take_up(response.session)
        return exported

    async def fork(self, session_id: str = "") -> AsyncSession:
        """A new session holding a copy of this one's state and position, after the steps
        this handle already sent. Without a ``session_id`` the SDK makes one, as for
        ``open_session`` (a retried fork then cannot make two)."""
        client = self._client
        new_id = session_id or _new_session_id()
        request = pb.ForkSessionRequest(session_id=self.session_id, new_session_id=new_id)

        async def settle(
            error: RnnserveError, deadline: float | None
        ) -> pb.ForkSessionResponse | None:
            if not isinstance(error, AlreadyExists):
                return None
            read = pb.ExportStateRequest(session_id=self.session_id)
            try:
                source = await client._call(
                    client._stub.ExportState, read, session_id=self.session_id, deadline=deadline
                )
            except RnnserveError:
                return None
            found = await client._untouched(
                new_id,
                deadline,
                model=source.session.model,
                version=source.session.version,
                position=source.session.position,
                state=from_tensor_map(source.state),
            )
            return None if found is None else pb.ForkSessionResponse(session=found)

        async with self._lock:  # this handle's steps do not move the source meanwhile
            response = await client._call(
                client._stub.ForkSession, request, session_id=self.session_id, settle=settle
            )
        found = response.session  # on the source's version, which a move may have changed
        model = await client._model(found.model, found.version or self.model.version, None)
        return AsyncSession(client, SessionInfo.from_proto(found), model)

    async def reset(self, state: Mapping[str, npt.ArrayLike] | None = None) -> None:
        """Set the state back to zeros (or ``state``) and the position to 0.

        Waits first for the steps this handle streamed before the call to be answered, as
        for a unary step in flight: one still queued on its stream could otherwise be applied
        after the reset, its reply then indistinguishable from one of before it. Steps
        streamed while the reset is under way are not counted once it is done (``refresh``
        afterwards)."""
        request = pb.ResetSessionRequest(
            session_id=self.session_id, state=encode_state(self.model, state)
        )
        async with self._lock:
            await self._quiesce(self._submitted)
            response = await self._client._call(
                self._client._stub.ResetSession, request, session_id=self.session_id
            )
            self._position = response.session.position
            self._epoch += 1
            await self._take_up(response.session)

    async def close(self) -> None:
        """Close the session on the server; later calls naming it raise SessionClosed.

        A close retried after a try whose reply was lost, and that finds the session gone
        (``SessionNotFound``), counts as done."""

        async def settle(
            error: RnnserveError, deadline: float | None
        ) -> pb.CloseSessionResponse | None:
            return pb.CloseSessionResponse() if isinstance(error, SessionNotFound) else None

        request = pb.CloseSessionRequest(session_id=self.session_id)
        await self._client._call(
            self._client._stub.CloseSession, request, session_id=self.session_id, settle=settle
        )
        self._closed = True

    def _advance(self, position: int) -> None:
        """Count a step's reply: the position only grows (replies may come out of order)."""
        self._position = max(self._position, position)

    def _read(self, position: int, alone: bool) -> None:
        """Count a position read from the server (GetSession, ExportState): set when no step
        of this handle's streams was in flight across the read, else like a step's reply."""
        if alone:
            self._position = position
        else:
            self._advance(position)

    def _stream_submitted(self) -> tuple[int, int]:
        """Note a step of this handle queued on a stream: its ordinal and the reset epoch it
        belongs to."""
        ordinal = self._submitted
        self._streamed += 1
        self._submitted += 1
        self._unanswered.add(ordinal)
        return ordinal, self._epoch

    def _stream_answered(self, ordinal: int, epoch: int, position: int | None) -> None:
        """Note a streamed step's outcome: applied at ``position``, or not (None)."""
        self._streamed -= 1
        self._unanswered.discard(ordinal)
        if self._answer is not None:
            self._answer.set()
            self._answer = None
        if position is not None and epoch == self._epoch:
            self._advance(position)

    async def _quiesce(self, before: int) -> None:
        """Wait until every step this handle streamed before ordinal ``before`` is answered
        (a stream that breaks answers all of its steps, so this ends)."""
        while any(ordinal < before for ordinal in self._unanswered):
            if self._answer is None:
                self._answer = asyncio.Event()
            await self._answer.wait()


_T = TypeVar("_T")
_INVALID_TENSOR = error_reason_pb2.ErrorReason.Name(error_reason_pb2.INVALID_TENSOR)


def _may_be_stale(error: InvalidInput) -> bool:
    """Whether inputs encoded from another version's description could explain ``error``:
    the SDK's own refusal (reason empty) or the server's INVALID_TENSOR."""
    return error.reason in ("", _INVALID_TENSOR)


def _new_session_id() -> str:
    """A session id as the server makes them: a random UUID4's 32 hexadecimal digits."""
    return uuid.uuid4().hex


async def _aiter(items: Iterable[_T] | AsyncIterable[_T]) -> AsyncIterator[_T]:
    """Iterate a sync or async iterable alike."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
