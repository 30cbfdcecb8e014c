"""A frontend process's handle on the engine in another process (the other end of
:mod:`rnnserve.server.engine.ipc`), with the same methods as the engine itself.

Steps submitted during one turn of the event loop leave as one message, each owner's as one
entry in columns (:data:`~rnnserve.server.engine.ipc.PackedSteps`); each stream's sink
and ticket are kept here (the engine sees only this frontend's own ticket numbers).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import errors
from ..busy_poll import BusyPoll
from ..engine.batcher import Outcome, Sink
from ..engine.core import StepIn
from ..engine.ipc import PackedOutcomes, Pipe, pack_steps, unpack_arrays
from ..engine.lifecycle import VersionStatus
from ..engine.store import SessionInfo
from ..errors import RnnserveError
from ..repository import Repository

logger = logging.getLogger(__name__)


class EngineClient:
    """The engine, seen from a frontend process."""

    def __init__(self, address: str, busy_poll_s: float = 0.0) -> None:
        self._address = address
        self._pipe = Pipe(self._handle, self._lost)
        self._busy_poll = BusyPoll(busy_poll_s)
        self._catalogue: Repository | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._tickets: dict[int, tuple[Sink, int, str]] = {}  # -> (sink, its ticket, session)
        self._ticket_ids = itertools.count()
        self._outgoing: list[tuple[str, list[StepIn]]] = []
        self._releasing: dict[Sink, int] = {}  # streams whose sessions the engine closes
        self._stream_ids = itertools.count()
        self._hello: asyncio.Future[Repository] | None = None
        self._catalogue_listeners: list[Callable[[Repository], None]] = []
        self._lost_listeners: list[Callable[[], None]] = []

    async def connect(self) -> None:
        """Start receiving and fetch the model catalogue (the engine is up once this returns;
        UNAVAILABLE if it closes the pipe first: its process died)."""
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        await loop.create_unix_connection(lambda: self._pipe, self._address)
        self._pipe.send(("hello",))
        self._catalogue = await self._hello

    async def close(self) -> None:
        self._pipe.close()

    def catalogue(self) -> Repository:
        assert self._catalogue is not None, "connect() first"
        return self._catalogue

    def on_catalogue(self, listener: Callable[[Repository], None]) -> None:
        self._catalogue_listeners.append(listener)

    def _new_catalogue(self, catalogue: Repository) -> None:
        self._catalogue = catalogue
        for listener in self._catalogue_listeners:
            try:
                listener(catalogue)
            except Exception:  # one listener must not keep the others from hearing
                logger.exception("event=catalogue_listener_failed")

    def on_lost(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the pipe to the engine is lost (the frontend stops serving)."""
        self._lost_listeners.append(listener)

    def _lost(self, pipe: Pipe) -> None:
        """The engine is gone (its process died or closed the pipe): calls and steps waiting
        on it fail now, UNAVAILABLE, rather than at their deadlines or the drain's end."""
        error = _engine_gone()
        if self._hello is not None and not self._hello.done():  # gone before it said hello
            self._hello.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        tickets, self._tickets = self._tickets, {}
        self._outgoing.clear()
        by_sink: dict[int, tuple[Sink, list[Outcome]]] = {}
        for sink, ticket, sid in tickets.values():
            by_sink.setdefault(id(sink), (sink, []))[1].append(Outcome(ticket, sid, error=error))
        self._answer(by_sink)
        for listener in self._lost_listeners:
            listener()

    def _handle(self, pipe: Pipe, message: Any) -> None:
        try:
            kind = message[0]
            if kind == "outcomes":
                self._deliver(message[1])
            elif kind == "reply":
                _, call_id, ok, value = message
                future = self._calls.pop(call_id, None)
                if future is not None and not future.done():
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(value)
            elif kind == "catalogue":  # versions came, went or retire
                _, number, catalogue = message
                self._new_catalogue(catalogue)
                # The call that changed it is answered once every frontend has said this.
                self._pipe.send(("catalogue_taken", number))
            elif kind == "hello" and self._hello is not None and not self._hello.done():
                self._hello.set_result(message[1])
        except Exception:
            logger.exception("event=ipc_message_failed")

    def _deliver(self, packed: PackedOutcomes) -> None:
        """Each sink its outcomes, with its own ticket numbers and its sessions' ids."""
        batches, numbers, positions, refs, rows, models, failures = packed
        arrays = [unpack_arrays(batch) for batch in batches]
        by_sink: dict[int, tuple[Sink, list[Outcome]]] = {}
        tickets = self._tickets
        for index, (number, position, ref, row, model) in enumerate(
            zip(numbers, positions, refs, rows, models, strict=True)
        ):
            found = tickets.pop(number, None)
            if found is None:  # its call was cancelled meanwhile
                continue
            sink, ticket, sid = found
            outcome = Outcome(
                ticket,
                sid,
                position,
                arrays[ref] if ref >= 0 else None,
                failures.get(index) if failures else None,
                row,
                model,
            )
            entry = by_sink.get(id(sink))
            if entry is None:
                by_sink[id(sink)] = (sink, [outcome])
            else:
                entry[1].append(outcome)
        self._answer(by_sink)

    @staticmethod
    def _answer(by_sink: dict[int, tuple[Sink, list[Outcome]]]) -> None:
        for sink, mine in by_sink.values():
            try:
                sink(mine)
            except Exception:
                logger.exception("event=deliver_failed")

    # -- steps -------------------------------------------------------------------------------
    def submit(self, steps: list[StepIn], owner: str, sink: Sink) -> None:
        if not steps:
            return
        if not self._pipe.connected:  # answered at once, as the engine answers a refusal
            error = _engine_gone()
            sink([Outcome(ticket, sid, error=error) for ticket, sid, *_ in steps])
            return
        self._busy_poll.touch()
        numbers, tickets, outgoing = self._ticket_ids, self._tickets, self._outgoing
        if not outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        if outgoing and outgoing[-1][0] == owner:  # one entry per owner and turn, not per call
            queued = outgoing[-1][1]
        else:
            queued = []
            outgoing.append((owner, queued))
        for ticket, sid, arrays, digest, expected in steps:
            number = next(numbers)
            tickets[number] = (sink, ticket, sid)
            queued.append((number, sid, arrays, digest, expected))

    def cancel(self, sink: Sink) -> None:
        """``sink``'s call ended: the engine drops its steps that have not run yet."""
        numbers = [n for n, (owner_sink, *_) in self._tickets.items() if owner_sink is sink]
        if not numbers:
            return
        for number in numbers:
            del self._tickets[number]
        self._flush()  # steps of this call still waiting here go first
        self._pipe.send(("cancel", numbers))

    # -- release on disconnect ----------------------------------------------------------------
    def close_on_end(self, sink: Sink, owner: str, session_ids: list[str]) -> None:
        """Have the engine close ``session_ids`` when ``sink``'s call (a stream that asked to
        release its sessions) ends: at :meth:`end`, or when this process is gone first (a
        crash, an OOM kill), which ends the call as surely for its client."""
        stream = self._releasing.get(sink)
        if stream is None:
            stream = self._releasing[sink] = next(self._stream_ids)
        self._pipe.send(("close_on_end", stream, owner, session_ids))

    def forget_on_end(self, sink: Sink, session_ids: list[str]) -> None:
        """Take ``session_ids`` back from those named to :meth:`close_on_end` for ``sink``'s
        call: their steps were answered NOT_FOUND, so they are not the stream's sessions
        (the engine need not keep, nor look for, ids a stream made up)."""
        stream = self._releasing.get(sink)
        if stream is not None:
            self._pipe.send(("forget_on_end", stream, session_ids))

    def end(self, sink: Sink) -> None:
        """``sink``'s call ended: the engine closes the sessions named to :meth:`close_on_end`."""
        stream = self._releasing.pop(sink, None)
        if stream is not None:
            self._pipe.send(("end", stream))

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if outgoing:
            self._pipe.send(("steps", [(owner, pack_steps(steps)) for owner, steps in outgoing]))

    # -- unary calls -------------------------------------------------------------------------
    async def _call(self, method: str, *args: Any) -> Any:
        if not self._pipe.connected:
            raise _engine_gone()
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self._pipe.send(("call", call_id, method, args))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def open_session(
        self,
        model: str,
        version: str,
        session_id: str,
        state: dict[str, np.ndarray],
        position: int,
        owner: str,
    ) -> SessionInfo:
        return await self._call("open_session", model, version, session_id, state, position, owner)  # type: ignore[no-any-return]

    async def get_session(self, session_id: str, owner: str) -> SessionInfo:
        return await self._call("get_session", session_id, owner)  # type: ignore[no-any-return]

    async def export_state(
        self, session_id: str, owner: str
    ) -> tuple[SessionInfo, dict[str, np.ndarray]]:
        return await self._call("export_state", session_id, owner)  # type: ignore[no-any-return]

    async def fork_session(self, session_id: str, new_session_id: str, owner: str) -> SessionInfo:
        return await self._call("fork_session", session_id, new_session_id, owner)  # type: ignore[no-any-return]

    async def reset_session(
        self, session_id: str, state: dict[str, np.ndarray], owner: str
    ) -> SessionInfo:
        return await self._call("reset_session", session_id, state, owner)  # type: ignore[no-any-return]

    async def close_session(self, session_id: str, owner: str) -> None:
        await self._call("close_session", session_id, owner)

    async def close_sessions(self, session_ids: list[str], owner: str) -> int:
        return await self._call("close_sessions", session_ids, owner)  # type: ignore[no-any-return]

    async def predict(
        self,
        model: str,
        version: str,
        arrays: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return await self._call("predict", model, version, arrays, state)  # type: ignore[no-any-return]

    async def load_model(self, model: str, version: str) -> list[VersionStatus]:
        return await self._call("load_model", model, version)  # type: ignore[no-any-return]

    async def retire_model(self, model: str, version: str, by: str) -> VersionStatus:
        return await self._call("retire_model", model, version, by)  # type: ignore[no-any-return]

    async def repository_index(self) -> list[VersionStatus]:
        return await self._call("repository_index")  # type: ignore[no-any-return]

    async def move_session(self, session_id: str, owner: str, version: str) -> SessionInfo:
        return await self._call("move_session", session_id, owner, version)  # type: ignore[no-any-return]


def _engine_gone() -> RnnserveError:
    return errors.unavailable(errors.SHUTTING_DOWN, "the engine is gone; retry")


__all__ = ["EngineClient", "RnnserveError"]
