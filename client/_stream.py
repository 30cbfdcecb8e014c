"""Many sessions' steps multiplexed on one StreamSteps call.

Each step gets a ``request_id`` and a future; the reader routes every result back to its
future by that id. A writer task sends whatever steps are waiting as one message, so steps
submitted in the same event-loop tick (or while the previous write was in flight) share a
message: under load the per-message cost is paid once for many steps.
"""

from __future__ import annotations

import asyncio
import itertools
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import numpy.typing as npt
from rnnserve.v1 import inference_service_pb2 as pb

from ._exceptions import RnnserveError, Unavailable, error_from_rpc, error_from_status
from ._inputs import Output, decode_outputs, encode_inputs

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


class AsyncStepStream:
    """A bidirectional StreamSteps call shared by any number of sessions.

    Within one session, steps are applied and answered in submission order; across sessions
    results arrive in any order. A step that fails raises its own error and the stream goes
    on; if the stream itself breaks, every unanswered step raises that error.

    Each reply of an applied step counts toward its session handle's ``position``, which
    only grows (a reply arriving after a later step's, of this stream, another or a unary
    ``step``, changes nothing). A step is encoded from its handle's ``model``; a step of a
    session moved to another version and refused for it is not sent again here, as a unary
    ``step`` is: ``refresh`` the handle to take up the new version.
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
        #: Unanswered steps by request id: their future, session, and the session's ordinal
        #: and reset epoch for the step (``AsyncSession._stream_submitted``).
        self._pending: dict[str, tuple[asyncio.Future[Output], AsyncSession, tuple[int, int]]] = {}
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
        request_id = str(next(self._ids))
        request = pb.StepRequest(
            session_id=session.session_id,
            inputs=encode_inputs(session.model, x, named),
            request_id=request_id,
        )
        future: asyncio.Future[Output] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, session, session._stream_submitted())
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
        for task in (self._writer, self._reader):
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
        entry = self._pending.pop(result.request_id, None)
        if entry is None:
            return
        future, session, (ordinal, epoch) = entry
        # Counted even when the caller stopped waiting (a cancelled future): an applied step
        # moved the session, and its next unary step must expect the position after it. A
        # reply arriving after a later step's (of another stream, or unary) moves nothing.
        applied = result.HasField("response")
        session._stream_answered(ordinal, epoch, result.response.position if applied else None)
        if future.done():
            return
        if result.HasField("error"):
            error = result.error
            retry_after = None
            if error.HasField("retry_delay"):
                delay = error.retry_delay
                retry_after = max(0.0, delay.seconds + delay.nanos / 1e9)
            future.set_exception(
                error_from_status(
                    error.code, error.message, error.reason, dict(error.metadata), retry_after
                )
            )
            return
        future.set_result(decode_outputs(result.response.outputs))

    def _fail_pending(self, failure: RnnserveError) -> None:
        pending, self._pending = self._pending, {}
        for future, session, (ordinal, epoch) in pending.values():
            session._stream_answered(ordinal, epoch, None)
            if not future.done():
                future.set_exception(failure)
