"""Graceful drain: after SIGTERM, refuse new calls with a retry hint and let running ones end.

The gate counts the calls in flight. Once :meth:`Drain.begin` is called, every new call is
answered ``UNAVAILABLE`` with a ``google.rpc.RetryInfo`` (and the ``ErrorInfo`` reason
``DRAINING``), which tells a client, or a proxy, to try again elsewhere or shortly; the
calls already running go on, and :meth:`Drain.wait_idle` returns when they are done (or the
grace period is spent). Only then are sessions snapshotted, so no step lands after the
snapshot. Health checks and reflection pass the gate: probes must see NOT_SERVING, not an
error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import grpc

from .. import errors
from ..errors import RnnserveError
from .status import abort

DRAINING_REASON = errors.DRAINING


class Drain:
    """Counts calls in flight and, once draining, turns new ones away."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        self._retry_after_s = retry_after_s
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._listeners: set[Callable[[], None]] = set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def begin(self) -> None:
        """Stop admitting calls; running unary calls are left alone, and every listener
        (each open StreamSteps call) is told, so streams can end themselves cleanly."""
        self._draining = True
        for listener in list(self._listeners):
            listener()

    def error(self) -> RnnserveError:
        """What a call turned away (or a stream ended) by the drain is answered."""
        return errors.unavailable(
            errors.DRAINING,
            "server is shutting down; retry shortly or on another replica",
            retry_after_s=self._retry_after_s,
        )

    def listen(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` when the drain begins (at once if it has); returns an
        unsubscribe function."""
        if self._draining:
            listener()
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call is in flight; False if ``timeout_s`` ran out first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Run one call inside the gate, or refuse it when draining."""
        if self._draining:
            await abort(context, self.error())
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
