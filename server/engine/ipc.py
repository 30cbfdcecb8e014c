"""The engine's side of the pipe to frontend processes (a unix socket, pickled messages).

Why a unix socket and pickle: see :class:`Pipe`. Each message costs a few microseconds of CPU
on either side, and batching makes that per batch, not per step: a frontend sends every step it
decoded in one turn of its event loop as one message, and the engine answers every
outcome of one batch for that frontend as one message that carries each output array once
(outcomes point into it by row). Numbers and alternatives: benchmarks/README.md.

Messages are tuples: ``("call", id, method, args)`` answered ``("reply", id, ok, value)`` for
the unary session calls, ``("steps", [(owner, PackedSteps), ...])`` (each owner's steps of
one turn as columns, :data:`PackedSteps`) answered by any number of ``("outcomes",
PackedOutcomes)`` (:data:`PackedOutcomes`), and ``("cancel", [ticket, ...])`` for steps whose
calls ended (dropped if they have not run). ``("close_on_end", stream, owner, [session id,
...])`` names sessions a stream asked to release (``close_sessions_on_end``), ``("forget_on_end",
stream, [session id, ...])`` takes back those its steps found not to exist, and ``("end",
stream)`` says that stream ended: the engine closes them then. A lost pipe ends every call of
its frontend (its process died): steps that have not run are dropped, and its streams'
sessions to release are closed. Whenever model
versions come, go or retire, every frontend that said ``("hello",)`` is sent ``("catalogue",
number, repository)`` (numbered from 1 in the order of the changes) and answers
``("catalogue_taken", number)`` once it serves from it. Errors cross as
:class:`~rnnserve.server.errors.RnnserveError`.

Read-your-writes across frontends: a lifecycle call (:data:`CATALOGUE_CALLS`) is answered only
once every frontend connected has taken up the catalogue as it stood when the call ended. A
client that loads a version through one frontend and then asks another (a new connection
lands on any) would otherwise be told the version does not exist: that frontend may not have
read the push yet, queued on its pipe behind a backlog of outcomes. The wait is bounded
(:data:`CATALOGUE_SYNC_S`): a frontend whose pipe closes stops being waited for at once, and
one alive but not answering (stopped, its loop stuck) delays the call by the bound at most,
then is logged (``event=catalogue_sync_timeout``) and the call answered anyway: the change is
made in the engine, and holding every operator's call on one broken frontend helps no one.
Steps never wait: only these calls do, after their work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from .. import errors
from ..errors import RnnserveError, internal
from .batcher import Outcome
from .core import Engine

logger = logging.getLogger(__name__)

#: Unary engine calls a frontend may make, by name (nothing else is callable over the pipe).
CALLS = frozenset(
    {
        "open_session",
        "get_session",
        "export_state",
        "fork_session",
        "reset_session",
        "close_session",
        "close_sessions",
        "predict",
        "load_model",
        "retire_model",
        "repository_index",
        "move_session",
    }
)


#: Calls that change the catalogue: answered once every frontend has taken up the change.
CATALOGUE_CALLS = frozenset({"load_model", "retire_model"})

#: The longest a catalogue call waits for frontends to take up its change (see the module's
#: docstring): far above a frontend's turn under load, far below a client's admin deadline.
CATALOGUE_SYNC_S = 5.0


#: The longest unix socket path every platform takes: ``sun_path`` holds 108 bytes on Linux and
#: 104 on macOS and the BSDs, the terminating NUL included.
SOCKET_PATH_MAX = 103


def socket_path(name: str = "engine.sock") -> Path:
    """Where the engine's socket goes: in a new private folder (mode 0700, so only this user
    may connect and submit steps), under the temporary folder (``TMPDIR``) when the path fits
    ``sun_path``, else under ``/tmp``. A deep ``TMPDIR`` (CI runners, sandboxes, macOS' per-user
    folders) would otherwise make ``bind`` fail and the server refuse to start.
    """
    for parent in (None, "/tmp"):
        folder = Path(tempfile.mkdtemp(prefix="rnnserve-engine-", dir=parent))
        path = folder / name
        if len(os.fsencode(path)) <= SOCKET_PATH_MAX:
            return path
        folder.rmdir()
    raise OSError(f"no temporary folder gives a unix socket path short enough: {path}")


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes | memoryview) -> Any:
    return pickle.loads(data)  # noqa: S301 (the pipe is private to this server's processes)


#: An array on the pipe: (dtype string, shape, bytes). Plain tuples and bytes pickle several
#: times faster than numpy arrays, whose pickling goes through ``__reduce__`` per array.
Packed = tuple[str, tuple[int, ...], Any]  # the data: a PickleBuffer sent, a bytearray received


def pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Packed]:
    # A PickleBuffer is written into the pickle straight from the array's memory: one copy
    # fewer than ``tobytes`` (measured 13 -> 6 µs to pickle 256 KiB); unpickled, a bytearray.
    return {
        name: (a.dtype.str, a.shape, pickle.PickleBuffer(cast(Any, np.ascontiguousarray(a))))
        for name, a in arrays.items()
    }


def unpack_arrays(packed: dict[str, Packed]) -> dict[str, np.ndarray]:
    return {
        name: np.frombuffer(data, dtype).reshape(shape)
        for name, (dtype, shape, data) in packed.items()
    }


#: Steps on the pipe, as columns: ``(tickets, session ids, digests, expected positions,
#: inputs)``. Digests and expected positions are None when no step has one. ``inputs`` is
#: ``(names, dtypes, shapes, blobs)`` when every step's inputs have the same names, dtypes and
#: shapes (a frontend's usual message: one model, one step per session), each input's rows of
#: every step in one bytes; else a list with each step's packed arrays (or its error). Lists of
#: ints and strings and a few bytes pickle in a fraction of a tuple, a dict and a bytes per
#: step: measured 2.9 -> 0.5 µs per step for pack, pickle, unpickle and unpack together (256
#: one-step entries), and the engine makes one submit per owner instead of one per stream.
PackedSteps = tuple[list[int], list[str], list[Any] | None, list[Any] | None, Any]


def pack_steps(steps: list[Any]) -> PackedSteps:
    tickets, sids, inputs, digests, expected = (list(column) for column in zip(*steps, strict=True))
    return (
        tickets,
        sids,
        None if digests.count(None) == len(digests) else digests,
        None if expected.count(None) == len(expected) else expected,
        _pack_inputs(inputs),
    )


def _pack_inputs(inputs: list[Any]) -> Any:
    """Every step's inputs as one bytes per input when they share names, dtypes and shapes.

    Not for empty arrays: their shape may name extents numpy indexes alone but not behind a
    leading axis of steps (``(0, 2**60)``: fine; ``(2, 0, 2**60)``: "array is too big"), and
    the engine could not rebuild the message. Such steps, all refused anyway, go one by one.
    """
    first = inputs[0]
    if type(first) is dict and first:
        names = tuple(first)
        kinds = [(a.dtype, a.shape) for a in first.values()]
        if all(shape and 0 not in shape and not dtype.hasobject for dtype, shape in kinds) and (
            _alike(inputs, names, kinds)
        ):
            blobs = [np.concatenate([a[name] for a in inputs]).tobytes() for name in names]
            return names, [dtype.str for dtype, _ in kinds], [shape for _, shape in kinds], blobs
    return [
        arrays if isinstance(arrays, RnnserveError) else pack_arrays(arrays) for arrays in inputs
    ]


def _alike(inputs: list[Any], names: tuple[str, ...], kinds: list[Any]) -> bool:
    """Whether every step's inputs have exactly ``names``, in order, with ``kinds``."""
    if len(names) == 1:  # the usual model: a plain loop, no list per step
        name, ((dtype, shape),) = names[0], kinds
        for arrays in inputs:
            if type(arrays) is not dict or len(arrays) != 1:
                return False
            array = arrays.get(name)
            if array is None or array.shape != shape or array.dtype != dtype:
                return False
        return True
    return all(
        type(arrays) is dict
        and tuple(arrays) == names
        and [(a.dtype, a.shape) for a in arrays.values()] == kinds
        for arrays in inputs
    )


def unpack_steps(packed: PackedSteps) -> list[Any]:
    tickets, sids, digests, expected, inputs = packed
    n = len(tickets)
    if type(inputs) is tuple:
        names, dtypes, shapes, blobs = inputs
        columns = [
            np.frombuffer(blob, dtype).reshape((n, *shape))
            for dtype, shape, blob in zip(dtypes, shapes, blobs, strict=True)
        ]
        if len(names) == 1:
            name = names[0]
            arrays: list[Any] = [{name: row} for row in columns[0]]
        else:
            arrays = [dict(zip(names, rows, strict=True)) for rows in zip(*columns, strict=True)]
    else:
        arrays = [a if isinstance(a, RnnserveError) else unpack_arrays(a) for a in inputs]
    return list(
        zip(
            tickets,
            sids,
            arrays,
            digests if digests is not None else [None] * n,
            expected if expected is not None else [None] * n,
            strict=True,
        )
    )


#: Outcomes on the pipe, as columns: ``(batches, tickets, positions, refs, rows, models,
#: errors)``. ``batches`` holds each batch's packed outputs once (``refs`` index it; -1: none),
#: ``errors`` maps an outcome's index to its error (most have none). No session ids: a frontend
#: knows each of its tickets' sessions, and a 32-character id per step was the largest part
#: of the message after the outputs. A frontend that has less than half of a batch's steps
#: gets only their rows (``rows`` then index those): with N frontends sharing batches, each
#: would otherwise pickle, send and unpickle the whole batch, N times the bytes in all.
PackedOutcomes = tuple[
    tuple[dict[str, Packed], ...],
    list[int],
    list[int],
    list[int],
    list[int],
    list[str],
    dict[int, RnnserveError],
]


def pack_outcomes(outcomes: list[Outcome]) -> PackedOutcomes:
    batches: dict[int, int] = {}
    outputs_of: list[dict[str, np.ndarray]] = []
    refs: list[int] = []
    errors: dict[int, RnnserveError] = {}
    for index, o in enumerate(outcomes):
        ref = -1
        if o.outputs is not None:
            ref = batches.get(id(o.outputs), -1)
            if ref == -1:
                ref = batches[id(o.outputs)] = len(outputs_of)
                outputs_of.append(o.outputs)
        refs.append(ref)
        if o.error is not None:
            errors[index] = o.error
    rows = [o.row for o in outcomes]
    packed: tuple[dict[str, Packed], ...]
    if len(outputs_of) == 1:  # the usual message: steps of one batch (counted in C)
        packed = (_pack_rows(outputs_of[0], 0, refs, rows, len(refs) - refs.count(-1)),)
    else:
        packed = tuple(
            _pack_rows(outputs, ref, refs, rows, refs.count(ref))
            for ref, outputs in enumerate(outputs_of)
        )
    return (
        packed,
        [o.ticket for o in outcomes],
        [o.position for o in outcomes],
        refs,
        rows,
        [o.model for o in outcomes],
        errors,
    )


def _pack_rows(
    outputs: dict[str, np.ndarray], ref: int, refs: list[int], rows: list[int], count: int
) -> dict[str, Packed]:
    """Batch ``ref``'s outputs: whole when these outcomes (``count`` of them) have at least
    half of its rows (one frontend: all of them, and no copy), else only their rows,
    renumbering ``rows``. Copying out half of a batch's rows costs more than sending the
    other half does; a quarter or less, less (benchmarks/README.md, third side-by-side run:
    256 rows of 1 KiB packed and pickled, an eighth of them 23 µs and 32 KiB against 28 µs
    and 256 KiB whole)."""
    extent = next((len(value) for value in outputs.values()), 0)  # batch axis first
    if 2 * count >= extent:
        return pack_arrays(outputs)
    mine = [index for index, r in enumerate(refs) if r == ref]
    taken = np.array([rows[index] for index in mine], np.intp)
    for new, index in enumerate(mine):
        rows[index] = new
    return pack_arrays({name: value[taken] for name, value in outputs.items()})


#: Each message's length ahead of it (a message is at most the engine's message limit).
_LENGTH = struct.Struct("<I")


class Pipe(asyncio.Protocol):
    """One end of the unix-socket connection between a frontend process and the engine:
    pickled messages, each behind its length.

    Why a plain stream socket on asyncio's own transport: written from the event loop, a
    message costs one ``send`` syscall, and a burst of them arrives in one read. The first pipe
    (pyzmq, ``zmq.asyncio``) moved every message through an I/O thread on each side and woke
    the loop once per message: measured between two processes on 2 cores
    (``python -m rnnserve.bench.ipc``, benchmarks/README.md) it cost 5x the CPU per message
    with 8 or more in flight and reached a sixth of the rate, CPU the gRPC frontends need.

    A send never waits and nothing is dropped while the peer lives: the transport buffers what
    the peer has not read yet. What can queue is bounded upstream (each stream's unanswered
    steps, each identity's step budget, each model's queue). A send to a peer that is gone is
    dropped, as its callers are gone too.
    """

    def __init__(
        self,
        on_message: Callable[[Pipe, Any], None],
        on_lost: Callable[[Pipe], None] | None = None,
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._on_lost is not None:
            self._on_lost(self)

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, message: Any) -> None:
        self.send_pickled(dumps(message))

    def send_pickled(self, data: bytes) -> None:
        """Send a message already pickled (one message for several pipes is pickled once)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        # Two buffers, not one joined: uvloop writes them with one writev, without a copy.
        transport.writelines((_LENGTH.pack(len(data)), data))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        whole: bytes | bytearray = data
        if buffer:
            buffer += data
            whole = buffer
        end, offset = len(whole), 0
        with memoryview(whole) as view:
            while end - offset >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(whole, offset)
                start = offset + _LENGTH.size
                if end - start < size:
                    break
                offset = start + size
                try:  # one bad message must not close the pipe (asyncio would, on a raise)
                    self._on_message(self, loads(view[start:offset]))
                except Exception:
                    logger.exception("event=ipc_message_failed bytes=%d", size)
        if whole is buffer:
            del buffer[:offset]
        elif offset < end:
            buffer += data[offset:]


class EngineServer:
    """Serves an :class:`Engine` to frontend processes on one unix socket at ``path``."""

    def __init__(
        self, engine: Engine, path: str, catalogue_sync_s: float = CATALOGUE_SYNC_S
    ) -> None:
        """``catalogue_sync_s``: how long a catalogue call waits for frontends to take up
        its change (:data:`CATALOGUE_SYNC_S`)."""
        self._engine = engine
        self.address = path
        self._server: asyncio.AbstractServer | None = None
        self._pipes: set[Pipe] = set()
        self._sinks: dict[Pipe, _FrontendSink] = {}
        self._calls: set[asyncio.Task[None]] = set()
        # Frontends that said hello (told of catalogue changes): the number of the latest
        # catalogue each has taken up.
        self._peers: dict[Pipe, int] = {}
        self._catalogue_number = 0  # of the latest catalogue sent
        self._catalogue_sync_s = catalogue_sync_s
        self._taken_up = asyncio.Event()  # set (and replaced) when a frontend takes one up
        # Per pipe, per stream: (owner, sessions) to close when the stream ends.
        self._releases: dict[Pipe, dict[int, tuple[str, set[str]]]] = {}
        self._closing = False
        engine.on_catalogue(self._send_catalogue)

    def _send_catalogue(self, catalogue: Any) -> None:
        self._catalogue_number += 1
        data = dumps(("catalogue", self._catalogue_number, catalogue))
        for pipe in self._peers:
            pipe.send_pickled(data)

    def _catalogue_taken(self, pipe: Pipe, number: int) -> None:
        """``pipe``'s frontend serves from catalogue ``number`` on: calls waiting look again."""
        if number > self._peers.get(pipe, number):
            self._peers[pipe] = number
            self._wake_catalogue_waiters()

    def _wake_catalogue_waiters(self) -> None:
        self._taken_up.set()
        self._taken_up = asyncio.Event()

    def _lagging(self, number: int) -> int:
        """How many frontends have not taken up catalogue ``number`` yet."""
        return sum(1 for taken in self._peers.values() if taken < number)

    async def _catalogue_synced(self, method: str) -> None:
        """Return once every frontend connected has taken up the catalogue as it is now (the
        one ``method`` left), or once the bound has passed (logged, with how many lag)."""
        number = self._catalogue_number
        if not self._lagging(number):
            return
        try:
            async with asyncio.timeout(self._catalogue_sync_s):
                while self._lagging(number):
                    await self._taken_up.wait()
        except TimeoutError:
            logger.warning(
                "event=catalogue_sync_timeout method=%s catalogue=%d frontends_behind=%d "
                "wait_s=%.1f (answered anyway; those frontends describe older versions until "
                "they read it)",
                method,
                number,
                self._lagging(number),
                self._catalogue_sync_s,
            )

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(
            self._connected, self.address
        )

    def _connected(self) -> Pipe:
        pipe = Pipe(self._handle, self._lost)
        self._pipes.add(pipe)
        return pipe

    def _lost(self, pipe: Pipe) -> None:
        """A frontend's pipe closed: its process stopped or died, and every call it served
        ended with it. Its steps not yet run are dropped, as a cancelled call's are, and the
        sessions its streams asked to release are closed, as those streams' ends would have.
        """
        self._pipes.discard(pipe)
        if self._peers.pop(pipe, None) is not None:
            self._wake_catalogue_waiters()  # no longer waited for
        sink = self._sinks.pop(pipe, None)
        if sink is not None:
            sink.lost = True
        releases = self._releases.pop(pipe, {})
        if not self._closing:  # the server's own stop: the engine has stopped already
            for owner, session_ids in releases.values():
                self._release(owner, session_ids)

    def _release(self, owner: str, session_ids: set[str]) -> None:
        self._engine.release_later(sorted(session_ids), owner)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.close()
        if self._server is not None:
            await self._server.wait_closed()

    def _handle(self, pipe: Pipe, message: Any) -> None:
        try:
            kind = message[0]
            if kind == "steps":
                sink = self._sinks.get(pipe)
                if sink is None:
                    sink = self._sinks[pipe] = _FrontendSink(pipe)
                for owner, steps in message[1]:
                    sink.unanswered.update(steps[0])  # the tickets column, in one call
                    self._engine.submit(unpack_steps(steps), owner, sink)
            elif kind == "cancel":
                sink = self._sinks.get(pipe)
                if sink is not None:
                    sink.cancel(message[1])
            elif kind == "close_on_end":
                _, stream, owner, session_ids = message
                streams = self._releases.setdefault(pipe, {})
                streams.setdefault(stream, (owner, set()))[1].update(session_ids)
            elif kind == "forget_on_end":
                _, stream, session_ids = message
                releasing = self._releases.get(pipe, {}).get(stream)
                if releasing is not None:
                    releasing[1].difference_update(session_ids)
            elif kind == "end":
                released = self._releases.get(pipe, {}).pop(message[1], None)
                if released is not None:
                    self._release(*released)
            elif kind == "call":
                task = asyncio.get_running_loop().create_task(self._call(pipe, *message[1:]))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
            elif kind == "catalogue_taken":
                self._catalogue_taken(pipe, message[1])
            elif kind == "hello":
                self._peers[pipe] = self._catalogue_number  # the catalogue it is sent now
                pipe.send(("hello", self._engine.catalogue()))
        except Exception:
            logger.exception("event=ipc_message_failed")

    async def _call(self, pipe: Pipe, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"not an engine call: {method!r}")
            value = await getattr(self._engine, method)(*args)
            reply = ("reply", call_id, True, value)
        except RnnserveError as error:
            reply = ("reply", call_id, False, error)
        except asyncio.CancelledError:
            # Always answered: a frontend waiting on a reply that never comes holds its
            # caller until the deadline. A cancelled run (the engine stopping) is UNAVAILABLE.
            pipe.send(("reply", call_id, False, _cancelled(method)))
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this task itself is being cancelled (the server closing)
            return
        except Exception:
            logger.exception("event=engine_call_failed method=%s", method)
            reply = ("reply", call_id, False, internal())
        if method in CATALOGUE_CALLS:
            try:  # read-your-writes on every frontend; answered even if cancelled meanwhile
                await self._catalogue_synced(method)
            finally:
                pipe.send(reply)
        else:
            pipe.send(reply)


class _FrontendSink:
    """Outcomes for one frontend, sent as one message per turn of the engine's loop."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._pending: list[Outcome] = []
        self.unanswered: set[int] = set()  # tickets submitted and not answered yet
        self.cancelled: set[int] = set()  # of those, the ones whose calls ended in the frontend
        self.lost = False  # the pipe closed: every call of that frontend ended

    def cancel(self, tickets: list[int]) -> None:
        """Drop these steps if they have not run. A ticket already answered (its outcome
        crossed the cancel on the pipe) is not kept: nothing would ever take it out again."""
        unanswered = self.unanswered
        self.cancelled.update(t for t in tickets if t in unanswered)

    def gone(self, ticket: int) -> bool:
        if self.lost:
            return True
        if ticket in self.cancelled:
            self.cancelled.discard(ticket)
            self.unanswered.discard(ticket)  # dropped: never answered
            return True
        return False

    def __call__(self, outcomes: list[Outcome]) -> None:
        discard = self.unanswered.discard
        for outcome in outcomes:
            discard(outcome.ticket)
        if self.cancelled:
            for outcome in outcomes:  # answered though cancelled (it was running): forget it
                self.cancelled.discard(outcome.ticket)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.extend(outcomes)

    def _flush(self) -> None:
        outcomes, self._pending = self._pending, []
        self._pipe.send(("outcomes", pack_outcomes(outcomes)))


def _cancelled(method: str) -> RnnserveError:
    return errors.unavailable(
        errors.SHUTTING_DOWN, f"the engine stopped the {method} call before it ended; retry"
    )
