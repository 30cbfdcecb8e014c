"""A bound on the steps each identity has queued and unanswered in one frontend.

A model's queue (``max_queue_size``) is shared by every caller, and a full queue answers
everyone RESOURCE_EXHAUSTED. Without a bound per caller, one identity that streams
thousands of steps (say, all on one session, which the engine runs one per batch) fills the
queue and every other identity's steps are refused: starvation by volume, with every one of
its requests valid. Here each identity may have at most ``limit`` steps handed to the engine
and not yet answered; past that its streams stop being read (gRPC's flow control holds the
client back) until its own steps are answered, and its unary steps are refused at once with
RESOURCE_EXHAUSTED (``QUOTA_EXCEEDED``), never queued silently. Other identities' steps
never wait for it. The bound is per frontend process; the engine's queue bound stays the
last word.
"""

from __future__ import annotations

import asyncio

#: Default: a quarter of the default model queue (4,096 steps), so a few busy identities
#: together cannot fill it, and far more than one client needs in flight to keep the
#: batcher busy.
STEPS_PER_IDENTITY = 1024


class StepBudget:
    """Unanswered steps by identity; :meth:`room` waits while an identity is at its limit."""

    def __init__(self, limit: int = STEPS_PER_IDENTITY) -> None:
        if limit < 1:
            raise ValueError(f"the step budget must be >= 1, got {limit}")
        self.limit = limit
        self._used: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def used(self, owner: str) -> int:
        return self._used.get(owner, 0)

    async def room(self, owner: str) -> None:
        """Return once ``owner`` has fewer than ``limit`` steps unanswered."""
        while self._used.get(owner, 0) >= self.limit:
            waiter = self._waiters.get(owner)
            if waiter is None:
                waiter = self._waiters[owner] = asyncio.Event()
            await waiter.wait()

    def take(self, owner: str, steps: int) -> None:
        """``steps`` more of ``owner``'s steps were handed to the engine."""
        self._used[owner] = self._used.get(owner, 0) + steps

    def give(self, owner: str, steps: int) -> None:
        """``steps`` of ``owner``'s steps were answered (or dropped)."""
        if steps <= 0:
            return
        left = self._used.get(owner, 0) - steps
        if left > 0:
            self._used[owner] = left
        else:
            self._used.pop(owner, None)
        if left < self.limit:
            waiter = self._waiters.pop(owner, None)
            if waiter is not None:
                waiter.set()
