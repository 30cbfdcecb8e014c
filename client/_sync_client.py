"""A blocking client: the async core run on a private event-loop thread.

Nothing here re-implements a call; each method hands the matching ``AsyncClient`` /
``AsyncSession`` coroutine to the loop thread and waits for it (``Session.steps`` feeds a
``StepStream`` from the caller's thread, so that its inputs are read there). Errors arrive as
the same ``RnnserveError`` subclasses.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import numpy.typing as npt

from ._async_client import AsyncClient, AsyncSession
from ._exceptions import Unavailable
from ._inputs import Output
from ._models import ExportedState, ModelInfo, Prediction, SessionInfo
from ._options import ClientOptions
from ._stream import MAX_MESSAGE_BYTES, AsyncStepStream

_T = TypeVar("_T")


class _LoopThread:
    """An event loop running forever on a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rnnserve-client", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._stopping = False

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        with self._lock:  # nothing is handed to a loop that is stopping
            if self._stopping or not self._thread.is_alive():
                coro.close()
                raise RuntimeError("the client is closed")
            return asyncio.run_coroutine_threadsafe(self._unless_stopped(coro), self.loop)

    async def _unless_stopped(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """``coro``, raising ``Unavailable`` if ``stop`` cancels it: a future handed out
        (``StepStream.submit``) then fails as every call in flight at close does, instead of
        being cancelled, which its waiter would get as ``concurrent.futures.CancelledError``."""
        try:
            return await coro
        except asyncio.CancelledError:
            if not self._stopping:
                raise  # cancelled through its future, by the caller
            raise Unavailable("the client was closed while this call was in flight") from None

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        try:
            return self.submit(coro).result()
        except concurrent.futures.CancelledError:  # stopped with the call in flight
            raise Unavailable("the client was closed while this call was in flight") from None

    def stop(self) -> None:
        """Stop the loop once every call handed to it has ended: a call another thread
        waits on is cancelled (it raises ``Unavailable`` there), never left hanging."""
        with self._lock:
            self._stopping = True

        async def finish() -> None:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(finish(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """Blocking twin of ``AsyncClient``: ``with Client("127.0.0.1:50051") as client: ...``."""

    def __init__(self, target: str, *, options: ClientOptions | None = None) -> None:
        self._runner = _LoopThread()

        async def connect() -> AsyncClient:
            # The channel must be created on the loop that will use it.
            return AsyncClient(target, options=options)

        self._async = self._runner.run(connect())
        self._closed = False

    @property
    def options(self) -> ClientOptions:
        """The options this client was made with."""
        return self._async.options

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread."""
        if self._closed:
            return
        self._closed = True
        self._runner.run(self._async.close())
        self._runner.stop()

    def list_models(self) -> list[ModelInfo]:
        """Every loaded model version."""
        return self._runner.run(self._async.list_models())

    def get_model(self, name: str, version: str = "") -> ModelInfo:
        """One model version (the highest when ``version`` is empty)."""
        return self._runner.run(self._async.get_model(name, version))

    def open_session(
        self,
        model: str,
        *,
        version: str = "",
        session_id: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | ExportedState | None = None,
        initial_position: int | None = None,
    ) -> Session:
        """Open a session; see ``AsyncClient.open_session``."""
        opened = self._runner.run(
            self._async.open_session(
                model,
                version=version,
                session_id=session_id,
                initial_state=initial_state,
                initial_position=initial_position,
            )
        )
        return Session(self._runner, opened)

    def session(self, session_id: str) -> Session:
        """A handle on an existing session."""
        return Session(self._runner, self._runner.run(self._async.session(session_id)))

    def predict(
        self,
        model: str,
        x: npt.ArrayLike | None = None,
        /,
        *,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
        **named: npt.ArrayLike,
    ) -> Prediction:
        """Run one whole sequence without a session."""
        return self._runner.run(
            self._async.predict(model, x, version=version, initial_state=initial_state, **named)
        )

    def stream(
        self,
        *,
        affinity: str = "",
        max_steps_per_message: int = 512,
        close_sessions_on_end: bool = False,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> StepStream:
        """A multiplexed step stream; see ``AsyncClient.stream``."""
        stream = self._async.stream(
            affinity=affinity,
            max_steps_per_message=max_steps_per_message,
            close_sessions_on_end=close_sessions_on_end,
            max_message_bytes=max_message_bytes,
        )
        return StepStream(self._runner, stream)


class Session:
    """Blocking twin of ``AsyncSession``; a context manager that closes the session."""

    def __init__(self, runner: _LoopThread, session: AsyncSession) -> None:
        self._runner = runner
        self._async = session

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self._async.session_id

    @property
    def position(self) -> int:
        """Timesteps consumed, as of the latest step the server reported applying (replies
        arriving out of order never move it back; ``reset`` sets it); see ``AsyncSession``."""
        return self._async.position

    @property
    def model(self) -> ModelInfo:
        """The model version the session runs, as last reported (a session moved to another
        version is taken up at the next refresh, export_state, reset or refused step)."""
        return self._async.model

    @property
    def closed(self) -> bool:
        """Whether this handle closed the session."""
        return self._async.closed

    def __repr__(self) -> str:
        return repr(self._async).replace("AsyncSession", "Session", 1)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.closed:
            self.close()

    def step(self, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike) -> Output:
        """Advance by the timesteps in ``x``; see ``AsyncSession.step``."""
        return self._runner.run(self._async.step(x, **named))

    def steps(self, inputs: Iterable[npt.ArrayLike], *, window: int = 32) -> Iterator[Output]:
        """Stream many steps over one call, yielding outputs in order; see
        ``AsyncSession.steps``.

        ``inputs`` is read here, in the calling thread, never on the client's loop thread:
        an input generator may block or call the client itself without stopping the loop
        that every call of the client (its own steps included) runs on.
        """
        if window < 1:
            raise ValueError("window must be >= 1")
        client = self._async._client
        with StepStream(self._runner, client.stream(affinity=self.session_id)) as stream:
            pending: collections.deque[concurrent.futures.Future[Output]] = collections.deque()
            for x in inputs:
                pending.append(stream.submit(self, x))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def refresh(self) -> SessionInfo:
        """Re-read the session from the server."""
        return self._runner.run(self._async.refresh())

    def export_state(self) -> ExportedState:
        """The session's state tensors and position."""
        return self._runner.run(self._async.export_state())

    def fork(self, session_id: str = "") -> Session:
        """A new session holding a copy of this one's state and position; see
        ``AsyncSession.fork``."""
        return Session(self._runner, self._runner.run(self._async.fork(session_id)))

    def reset(self, state: Mapping[str, npt.ArrayLike] | None = None) -> None:
        """Set the state back to zeros (or ``state``) and the position to 0."""
        self._runner.run(self._async.reset(state))

    def close(self) -> None:
        """Close the session on the server; see ``AsyncSession.close``."""
        self._runner.run(self._async.close())


class StepStream:
    """Blocking twin of ``AsyncStepStream``: ``submit`` returns a concurrent future."""

    def __init__(self, runner: _LoopThread, stream: AsyncStepStream) -> None:
        self._runner = runner
        self._async = stream

        async def start() -> None:
            stream.start()

        self._runner.run(start())

    def __enter__(self) -> StepStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._runner.run(self._async.abort())

    def submit(
        self, session: Session, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike
    ) -> concurrent.futures.Future[Output]:
        """Queue one step of ``session``; the future resolves to its outputs."""
        return self._runner.submit(self._async.step(session._async, x, **named))

    def step(
        self, session: Session, x: npt.ArrayLike | None = None, /, **named: npt.ArrayLike
    ) -> Output:
        """Run one step of ``session`` on this stream."""
        return self.submit(session, x, **named).result()

    def close(self) -> None:
        """Half-close and wait for every submitted step's result."""
        self._runner.run(self._async.close())
