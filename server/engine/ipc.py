"""The engine's side of the pipe to frontend processes (pyzmq, ROUTER socket, pickled frames).

Why pyzmq and pickle: measured on 2 cores, one pickled zmq round trip of a step's arrays costs
tens of microseconds, and batching makes it per batch, not per step: a frontend sends every
step it decoded in one turn of its event loop as one message, and the engine answers every
outcome of one batch for that frontend as one message that carries each output array once
(outcomes point into it by row). Numbers and alternatives: benchmarks/README.md.

Messages are tuples: ``("call", id, method, args)`` answered ``("reply", id, ok, value)`` for
the unary session calls, ``("steps", [(owner, [StepIn, ...]), ...])`` answered by any number
of ``("outcomes", [...])``, and ``("cancel", [ticket, ...])`` for steps whose calls ended
(dropped if they have not run). Whenever model versions come, go or retire, every frontend
that said ``("hello",)`` is sent ``("catalogue", repository)``, ahead of the reply to the
call that changed it. Errors cross as :class:`~rnnserve.server.errors.RnnserveError`.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

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


def unbounded(socket: zmq.Socket) -> None:
    """No high-water mark on ``socket``: past zmq's default 1,000 queued messages a ROUTER
    drops what it sends and a non-blocking DEALER send fails, and a dropped "steps" or
    "outcomes" message is a caller waiting forever. What can queue is bounded upstream: each
    stream's unanswered steps, each identity's step budget, each model's queue."""
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)  # noqa: S301 (the pipe is private to this server's processes)


#: An array on the pipe: (dtype string, shape, bytes). Plain tuples and bytes pickle several
#: times faster than numpy arrays, whose pickling goes through ``__reduce__`` per array.
Packed = tuple[str, tuple[int, ...], bytes]


def pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Packed]:
    return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in arrays.items()}


def unpack_arrays(packed: dict[str, Packed]) -> dict[str, np.ndarray]:
    return {
        name: np.frombuffer(data, dtype).reshape(shape)
        for name, (dtype, shape, data) in packed.items()
    }


def pack_steps(steps: list[Any]) -> list[tuple[Any, ...]]:
    return [
        (ticket, sid, arrays if isinstance(arrays, RnnserveError) else pack_arrays(arrays),
         digest, expected)
        for ticket, sid, arrays, digest, expected in steps
    ]  # fmt: skip


def unpack_steps(packed: list[tuple[Any, ...]]) -> list[Any]:
    return [
        (ticket, sid, arrays if isinstance(arrays, RnnserveError) else unpack_arrays(arrays),
         digest, expected)
        for ticket, sid, arrays, digest, expected in packed
    ]  # fmt: skip


def pack_outcomes(outcomes: list[Outcome]) -> list[tuple[Any, ...]]:
    """Outcomes as plain tuples; each batch's output arrays travel once."""
    batches: dict[int, int] = {}
    arrays: list[dict[str, Packed]] = []
    packed: list[tuple[Any, ...]] = []
    for o in outcomes:
        ref = -1
        if o.outputs is not None:
            ref = batches.get(id(o.outputs), -1)
            if ref == -1:
                ref = len(arrays)
                batches[id(o.outputs)] = ref
                arrays.append(pack_arrays(o.outputs))
        packed.append((o.ticket, o.session_id, o.position, ref, o.row, o.error, o.model))
    return [tuple(arrays), *packed]


def unpack_outcomes(packed: list[tuple[Any, ...]]) -> list[Outcome]:
    arrays = [unpack_arrays(batch) for batch in packed[0]]
    return [
        Outcome(ticket, sid, position, arrays[ref] if ref >= 0 else None, error, row, model)
        for ticket, sid, position, ref, row, error, model in packed[1:]
    ]


class EngineServer:
    """Serves an :class:`Engine` to frontend processes over one zmq ROUTER socket."""

    def __init__(self, engine: Engine, address: str) -> None:
        self._engine = engine
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        unbounded(self._socket)
        self._socket.bind(address)
        self.address = address
        self._task: asyncio.Task[None] | None = None
        self._sinks: dict[bytes, _FrontendSink] = {}
        self._calls: set[asyncio.Task[None]] = set()
        self._peers: set[bytes] = set()  # frontends that said hello: told of catalogue changes
        engine.on_catalogue(self._send_catalogue)

    def _send_catalogue(self, catalogue: Any) -> None:
        data = dumps(("catalogue", catalogue))
        for peer in self._peers:
            self._socket.send_multipart([peer, data], flags=zmq.NOBLOCK)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._socket.close(0)
        self._context.term()

    async def _serve(self) -> None:
        socket = self._socket
        while True:
            peer, data = await socket.recv_multipart(copy=True)
            try:
                message = loads(data)
                kind = message[0]
                if kind == "steps":
                    sink = self._sinks.get(peer)
                    if sink is None:
                        sink = self._sinks[peer] = _FrontendSink(socket, peer)
                    for owner, steps in message[1]:
                        self._engine.submit(unpack_steps(steps), owner, sink)
                elif kind == "cancel":
                    sink = self._sinks.get(peer)
                    if sink is not None:
                        sink.cancelled.update(message[1])
                elif kind == "call":
                    task = asyncio.get_running_loop().create_task(self._call(peer, *message[1:]))
                    self._calls.add(task)
                    task.add_done_callback(self._calls.discard)
                elif kind == "hello":
                    self._peers.add(peer)
                    await socket.send_multipart([peer, dumps(("hello", self._engine.catalogue()))])
            except Exception:
                logger.exception("event=ipc_message_failed")

    async def _call(self, peer: bytes, call_id: int, method: str, args: tuple[Any, ...]) -> None:
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
            reply = ("reply", call_id, False, _cancelled(method))
            self._socket.send_multipart([peer, dumps(reply)], flags=zmq.NOBLOCK)
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this task itself is being cancelled (the server closing)
            return
        except Exception:
            logger.exception("event=engine_call_failed method=%s", method)
            reply = ("reply", call_id, False, internal())
        await self._socket.send_multipart([peer, dumps(reply)])


class _FrontendSink:
    """Outcomes for one frontend, sent as one message per turn of the engine's loop."""

    def __init__(self, socket: zmq.asyncio.Socket, peer: bytes) -> None:
        self._socket = socket
        self._peer = peer
        self._pending: list[Outcome] = []
        self.cancelled: set[int] = set()  # tickets whose calls ended in the frontend

    def gone(self, ticket: int) -> bool:
        if ticket in self.cancelled:
            self.cancelled.discard(ticket)
            return True
        return False

    def __call__(self, outcomes: list[Outcome]) -> None:
        if self.cancelled:
            for outcome in outcomes:  # answered before the cancel arrived: forget it
                self.cancelled.discard(outcome.ticket)
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.extend(outcomes)

    def _flush(self) -> None:
        outcomes, self._pending = self._pending, []
        data = dumps(("outcomes", pack_outcomes(outcomes)))
        # A ROUTER socket never blocks a send: a frontend that is gone drops it.
        self._socket.send_multipart([self._peer, data], flags=zmq.NOBLOCK)


def _cancelled(method: str) -> RnnserveError:
    return errors.unavailable(
        errors.SHUTTING_DOWN, f"the engine stopped the {method} call before it ended; retry"
    )
