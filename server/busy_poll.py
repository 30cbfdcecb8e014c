"""Keep the event loop polling for a short while after each step, instead of sleeping.

Why: a closed-loop client's next step arrives a few hundred microseconds after its answer
left. A loop that went to sleep in ``epoll_wait`` meanwhile pays for waking (the kernel's
wake-up, and caches and clocks gone cold on an idle core) on every step: measured on 2 cores
with one streaming session, a loop kept polling for 1.5 ms answered in ~510 µs p50 instead of
~680 (unary Step ~840 instead of ~1,100; docs/server.md, "Busy polling"). The same trade
onnxruntime makes for its thread pool (``allow_spinning``) and Linux offers for sockets
(``busy_poll``).

Bounded so that it costs nothing when nothing happens: the loop polls only for ``window_s``
after the last step it saw, and yields the core (``sched_yield``) on every turn, so another
runnable thread or process (gRPC's poller, a frontend, the client on the same host) goes
first. Under load the loop is busy anyway and the poll is one callback per turn. A server
that takes a step every 10 ms spends at most ``window_s`` of a core per step polling:
``--busy-poll-us 0`` turns it off.
"""

from __future__ import annotations

import asyncio
import os

#: Gives the core to any other runnable thread or process (a no-op where the OS has no call).
_yield_core = getattr(os, "sched_yield", lambda: None)


class BusyPoll:
    """One per event loop; :meth:`touch` on every step received."""

    __slots__ = ("_window_s", "_loop", "_until", "_touched", "_polling")

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._until = 0.0
        self._touched = False
        self._polling = False

    @property
    def polling(self) -> bool:
        return self._polling

    def touch(self) -> None:
        """A step arrived: poll until ``window_s`` after the last one."""
        if self._polling:
            self._touched = True  # the poll itself moves its deadline (no clock read here)
            return
        if self._window_s <= 0:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._polling = True
        self._until = loop.time() + self._window_s
        loop.call_soon(self._poll)

    def _poll(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if self._touched:
            self._touched = False
            self._until = now + self._window_s
        if now >= self._until:
            self._polling = False
            return
        _yield_core()
        loop.call_soon(self._poll)
