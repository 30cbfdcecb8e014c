"""Many sessions' steps multiplexed on one StreamSteps call.

Each step gets a ``request_id`` and a future; the reader routes every result back to its
future by that id. A writer task sends whatever steps are waiting as one message, so steps
submitted in the same event-loop tick (or while the previous write was in flight) share a
message: under load the per-message cost is paid once for many steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt
from rnnserve.v1 import error_reason_pb2
from rnnserve.v1 import inference_service_pb2 as pb

from ._exceptions import (
    InvalidInput,
    RnnserveError,
    Unavailable,
    error_from_rpc,
    error_from_status,
)
from ._inputs import Output, decode_outputs, encode_inputs
from ._models import ModelInfo
from ._tensors import from_tensor_map

if TYPE_CHECKING:
    from ._async_client import AsyncClient, AsyncSession

_CLOSE = None  # queue sentinel: half-close the call after everything before it is written
#: Coalesced steps per message stop short of this many bytes (a lone larger step goes alone):
#: well under the 4 MiB a gRPC server reads by default, so steps each valid alone never make
#: a message the server refuses, which would end the stream for every session on it.
MAX_MESSAGE_BYTES = 1 << 20
#: What ``close_sessions_on_end=True`` adds to every message: field 2's tag and its varint 1.
_CLOSE_FLAG_BYTES = 2


def _framed_size(step: pb.StepRequest) -> int:
    """The bytes ``step`` takes in a StreamStepsRequest: its own encoding plus its framing as
    an element of the repeated field 1 (a one-byte tag and the varint of its length). A
    bound counted without the framing lets a message of small steps outgrow it by a few bytes
    a step, and a server reading exactly that bound ends the stream over it."""
    size = step.ByteSize()
    return 1 + _varint_size(size) + size


def _varint_size(value: int) -> int:
    """Bytes of ``value`` (>= 0) as a protobuf varint: 7 bits a byte."""
    return max(1, (value.bit_length() + 6) // 7)


@dataclasses.dataclass(eq=False)
class _Step:
    """One unanswered step: its future, its handle, what it counts toward there
    (``AsyncSession._stream_submitted``), and what is needed to send it again."""

    future: asyncio.Future[Output]
    session: AsyncSession
    ordinal: int
    epoch: int
    request: pb.StepRequest
    order: int  # its place among the stream's submissions: a step sent again keeps it
    version: str  # the model version its inputs were encoded for
    positional: bool  # given as ``x``: re-encoded as another version's only input
    resent: bool = False


@dataclasses.dataclass(eq=False)
class _Recovery:
    """A session's steps refused on this stream as not fitting the version they were encoded
    for, held with the steps that must follow them until its version is re-read and every
    step of it sent before the first refusal is answered (each later one is refused too, or
    was applied, and then the refused ones before it can no longer go first)."""

    version: str  # the version the refused steps were encoded for
    waiting: set[str]  # request ids of the session's steps sent before, not answered yet
    steps: list[tuple[_Step, RnnserveError | None]]  # refused (with their error), or held
    read: bool = False  # the session's version was re-read (or could not be)
    model: ModelInfo | None = None  # the version it is on, when another than ``version``


class AsyncStepStream:
    """A bidirectional StreamSteps call shared by any number of sessions.

    Within one session, steps are applied and answered in submission order; across sessions
    results arrive in any order. A step that fails raises its own error and the stream goes
    on; if the stream itself breaks, every unanswered step raises that error.

    Each reply of an applied step counts toward its session handle's ``position``, which
    only grows (a reply arriving after a later step's, of this stream, another or a unary
    ``step``, changes nothing). A step is encoded from its handle's ``model``. A step refused
    because its inputs do not fit (``INVALID_TENSOR``: the session was moved to another
    version with MoveSession) makes the stream re-read the session's version, as a unary
    ``step`` does: if it changed, the refused step and the session's later steps refused
    the same way are encoded for the new version and sent again once, in their order, and
    the session's steps submitted meanwhile wait behind them. A refused step changed
    nothing, so none is applied twice; one followed by a step of its session that the new
    version took (applied) is not sent again, as it can no longer go first, and raises its
    error; so does one refused once the stream is closing.
    """

    def __init__(
        self,
        client: AsyncClient,
        *,
        affinity: str = "",
        max_steps_per_message: int = 512,
        close_sessions_on_end: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if max_steps_per_message < 1:
            raise ValueError("max_steps_per_message must be >= 1")
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be >= 1")
        self._client = client
        self._max_steps = max_steps_per_message
        self._max_bytes = max_message_bytes
        self._affinity = affinity
        self._close_sessions_on_end = close_sessions_on_end
        self._queue: asyncio.Queue[pb.StepRequest | None] = asyncio.Queue()
        #: Unanswered steps by request id (a step sent again gets a new one).
        self._pending: dict[str, _Step] = {}
        #: Sessions whose steps were refused as not fitting, by session id (see ``_Recovery``).
        self._recovering: dict[str, _Recovery] = {}
        self._recovered = asyncio.Event()  # set whenever no session is recovering
        self._recovered.set()
        self._tasks: set[asyncio.Task[None]] = set()  # re-reads of sessions' versions
        self._close_queued = False
        self._ids = itertools.count()
        self._call: Any = None
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._failure: RnnserveError | None = None
        self._closing = False
        self.messages_sent = 0
        self.steps_sent = 0

    async def __aenter__(self) -> AsyncStepStream:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            await self.abort()

    def start(self) -> None:
        """Open the call and start its writer and reader tasks."""
        if self._call is not None:
            return
        options = self._client.options
        self._call = self._client._stub.StreamSteps(metadata=options.call_metadata(self._affinity))
        self._writer = asyncio.create_task(self._write(), name="rnnserve-stream-writer")
        self._reader = asyncio.create_task(self._read(), name="rnnserve-stream-reader")

    @property
    def in_flight(self) -> int:
        """Steps submitted and not yet answered."""
        return len(self._pending)

    def submit(
        self, session: AsyncSession, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike
    ) -> asyncio.Future[Output]:
        """Queue one step of ``session``; the future resolves to its outputs."""
        if self._failure is not None:
            raise self._failure
        if self._closing or self._call is None:
            raise RuntimeError("the stream is not open")
        model = session.model
        order = next(self._ids)
        request = pb.StepRequest(
            session_id=session.session_id,
            inputs=encode_inputs(model, x, named),
            request_id=str(order),
        )
        future: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        ordinal, epoch = session._stream_submitted()
        step = _Step(future, session, ordinal, epoch, request, order, model.version, x is not None)
        self._pending[request.request_id] = step
        recovery = self._recovering.get(session.session_id)
        if recovery is not None:
            recovery.steps.append((step, None))  # behind the session's refused steps
        else:
            self._queue.put_nowait(request)
        return future

    async def step(
        self, session: AsyncSession, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike
    ) -> Output:
        """Run one step of ``session`` on this stream and return its outputs."""
        return await self.submit(session, x, **named)

    async def close(self) -> None:
        """Half-close after every queued step is sent, and wait for all their results."""
        if self._call is None or self._closing:
            return
        self._closing = True
        # Steps held behind a session's refused ones are sent before the half-close; a
        # recovery that starts as another ends is waited for too (each ends: a step is sent
        # again at most once).
        while self._recovering:
            await self._recovered.wait()
        self._close_queued = True
        self._queue.put_nowait(_CLOSE)
        assert self._writer is not None and self._reader is not None
        # The writer's own end says nothing the reader does not: a call cancelled under a
        # write (the client closed) ends it with CancelledError, which is not the caller's.
        await asyncio.gather(self._writer, self._reader, return_exceptions=True)
        if self._failure is not None:
            raise self._failure

    async def abort(self) -> None:
        """Cancel the call now; unanswered steps raise ``Unavailable``."""
        if self._call is None:
            return
        self._closing = True
        self._call.cancel()
        for task in (self._writer, self._reader, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._writer, self._reader) if t), return_exceptions=True
        )
        self._fail_pending(Unavailable("the step stream was cancelled"))

    async def _write(self) -> None:
        """Send queued steps, as many per message as are waiting, up to the caps (steps and
        bytes)."""
        held: pb.StepRequest | None = None  # taken from the queue, left for the next message
        while True:
            item = held if held is not None else await self._queue.get()
            held = None
            steps: list[pb.StepRequest] = []
            size = _CLOSE_FLAG_BYTES if self._close_sessions_on_end else 0  # the message's own
            while item is not None:
                item_size = _framed_size(item)
                if steps and size + item_size > self._max_bytes:
                    held = item
                    break
                steps.append(item)
                size += item_size
                if len(steps) >= self._max_steps or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            try:
                if steps:
                    self.messages_sent += 1
                    self.steps_sent += len(steps)
                    await self._call.write(
                        pb.StreamStepsRequest(
                            steps=steps, close_sessions_on_end=self._close_sessions_on_end
                        )
                    )
                if item is None and held is None:
                    await self._call.done_writing()
                    return
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the call ended; the reader reports why and fails what is pending

    async def _read(self) -> None:
        """Route each result to its step's future; fail the rest when the call ends."""
        try:
            async for response in self._call:
                for result in response.results:
                    self._resolve(result)
        except grpc.RpcError as exc:
            self._failure = error_from_rpc(exc)
            self._fail_pending(self._failure)
        except asyncio.CancelledError:  # the call was cancelled (the client closed) or this task
            self._failure = Unavailable("the step stream was cancelled")
            self._fail_pending(self._failure)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        else:
            self._fail_pending(Unavailable("the step stream ended before answering this step"))
        finally:
            # The call is over, so the writer has nothing left to do, and may never learn it:
            # one waiting for a call cancelled before it started waits forever.
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()

    def _resolve(self, result: pb.StepResult) -> None:
        step = self._pending.get(result.request_id)
        if step is None:
            return
        error = _error_of(result.error) if result.HasField("error") else None
        session_id = step.request.session_id
        recovery = self._recovering.get(session_id)
        if recovery is not None and result.request_id in recovery.waiting:
            recovery.waiting.discard(result.request_id)
            if error is not None and self._resendable(step, error, recovery.version):
                recovery.steps.append((step, error))
                self._recover(session_id)
                return
            # Applied, or failed otherwise: the refused steps before it cannot go first now.
            for refused, refusal in recovery.steps:
                if refusal is not None:
                    self._finish(refused, refusal)
            recovery.steps = [(held, None) for held, refusal in recovery.steps if refusal is None]
        elif recovery is None and error is not None and self._resendable(step, error, step.version):
            self._start_recovery(step, error)
            return
        del self._pending[result.request_id]
        # Counted even when the caller stopped waiting (a cancelled future): an applied step
        # moved the session, and its next unary step must expect the position after it. A
        # reply arriving after a later step's (of another stream, or unary) moves nothing.
        applied = result.HasField("response")
        position = result.response.position if applied else None
        step.session._stream_answered(step.ordinal, step.epoch, position)
        if not step.future.done():
            if error is not None:
                step.future.set_exception(error)
            else:
                step.future.set_result(decode_outputs(result.response.outputs))
        if recovery is not None:
            self._recover(session_id)

    def _resendable(self, step: _Step, error: RnnserveError, version: str) -> bool:
        """Whether ``step`` may go again once its session's version is read again: refused
        as not fitting, encoded for ``version``, never sent again, and the stream not yet
        half-closed."""
        return (
            isinstance(error, InvalidInput)
            and error.reason == _INVALID_TENSOR
            and step.version == version
            and not step.resent
            and not self._close_queued
        )

    def _start_recovery(self, step: _Step, error: RnnserveError) -> None:
        """Hold ``step`` (refused) and re-read its session's version; the session's steps
        sent after it are answered first (see ``_Recovery``)."""
        session_id = step.request.session_id
        waiting = {
            request_id
            for request_id, other in self._pending.items()
            if other.request.session_id == session_id and other is not step
        }
        recovery = _Recovery(step.version, waiting, [(step, error)])
        self._recovering[session_id] = recovery
        self._recovered.clear()
        task = asyncio.create_task(self._reread(step.session, recovery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reread(self, session: AsyncSession, recovery: _Recovery) -> None:
        """Read the session's version again (the handle takes it up), then go on."""
        try:
            await session._moved()  # False, and the handle as it was, when it cannot read
            if session.model.version != recovery.version:
                recovery.model = session.model
        except RuntimeError:
            pass  # the client closed: the stream fails every step it holds
        finally:
            recovery.read = True
            self._recover(session.session_id)

    def _recover(self, session_id: str) -> None:
        """Once the session's version is read and its steps sent before are answered: send
        the refused steps again (encoded for the new version) and the held ones, in the
        order they were submitted, or fail the refused ones with their errors."""
        recovery = self._recovering.get(session_id)
        if recovery is None or recovery.waiting or not recovery.read:
            return
        del self._recovering[session_id]
        if not self._recovering:
            self._recovered.set()
        model = recovery.model
        for step, refusal in sorted(recovery.steps, key=lambda entry: entry[0].order):
            if self._pending.get(step.request.request_id) is not step:
                continue  # answered meanwhile (the stream failed)
            if refusal is not None and (model is None or self._close_queued):
                self._finish(step, refusal)
                continue
            if model is not None and step.version != model.version:
                try:
                    inputs = _reencode(model, step)
                except InvalidInput as exc:
                    self._finish(step, refusal or exc)
                    continue
                step.version = model.version
            else:
                inputs = dict(step.request.inputs)
            del self._pending[step.request.request_id]
            step.request = pb.StepRequest(
                session_id=session_id, inputs=inputs, request_id=str(next(self._ids))
            )
            step.resent = step.resent or refusal is not None
            self._pending[step.request.request_id] = step
            self._queue.put_nowait(step.request)

    def _finish(self, step: _Step, error: RnnserveError) -> None:
        """Answer an unanswered step with ``error``: it changed nothing."""
        del self._pending[step.request.request_id]
        step.session._stream_answered(step.ordinal, step.epoch, None)
        if not step.future.done():
            step.future.set_exception(error)

    def _fail_pending(self, failure: RnnserveError) -> None:
        pending, self._pending = self._pending, {}
        self._recovering.clear()
        self._recovered.set()
        for step in pending.values():
            step.session._stream_answered(step.ordinal, step.epoch, None)
            if not step.future.done():
                step.future.set_exception(failure)


_INVALID_TENSOR = error_reason_pb2.ErrorReason.Name(error_reason_pb2.INVALID_TENSOR)


def _error_of(error: pb.StepError) -> RnnserveError:
    """The SDK's exception for a step's error on the stream."""
    retry_after = None
    if error.HasField("retry_delay"):
        delay = error.retry_delay
        retry_after = max(0.0, delay.seconds + delay.nanos / 1e9)
    return error_from_status(
        error.code, error.message, error.reason, dict(error.metadata), retry_after
    )


def _reencode(model: ModelInfo, step: _Step) -> dict[str, Any]:
    """``step``'s inputs encoded for ``model``, from what was sent (the caller's arrays may
    have been reused since): by the names given, or as the only input when given as ``x``."""
    values = from_tensor_map(step.request.inputs)
    if step.positional:
        (only,) = values.values()
        return encode_inputs(model, only, {})
    return encode_inputs(model, None, values)
