"""A bound on the steps, and on their bytes, each identity has queued and unanswered in one
frontend.

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

Steps are not all the same size: under the step bound alone, one identity could hold
``limit`` steps of the largest message gRPC reads (~4 GiB at the defaults) in the frontend's
memory, and starve the process for everyone. So the bytes of its unanswered steps are
bounded too, at ``byte_limit``, measured as each request's serialized size (what a step
holds while it waits: its decoded inputs and the ids its result echoes). A step whose bytes
do not fit what is left is treated exactly as a step past ``limit``: a stream waits, a unary
step is refused. One exception: a step larger than the whole ``byte_limit`` is admitted when
the identity has nothing else unanswered, so any step gRPC reads can run (alone). An
identity therefore holds at most ``max(byte_limit, one step)`` bytes of unanswered steps.
"""

from __future__ import annotations

import asyncio

#: Default: a quarter of the default model queue (4,096 steps), so a few busy identities
#: together cannot fill it, and far more than one client needs in flight to keep the
#: batcher busy.
STEPS_PER_IDENTITY = 1024
#: Default: 256 MiB, four times the largest receive limit a frontend sizes for itself
#: (64 MiB, limits.py), so a client that keeps a few of the largest steps in flight is not
#: held back, while a frontend holds at most this much of any one identity's requests.
BYTES_PER_IDENTITY = 256 << 20


class StepBudget:
    """Unanswered steps and their bytes by identity; :meth:`room` waits while an identity
    is at its limit."""

    def __init__(
        self, limit: int = STEPS_PER_IDENTITY, byte_limit: int = BYTES_PER_IDENTITY
    ) -> None:
        if limit < 1:
            raise ValueError(f"the step budget must be >= 1, got {limit}")
        if byte_limit < 1:
            raise ValueError(f"the byte budget must be >= 1, got {byte_limit}")
        self.limit = limit
        self.byte_limit = byte_limit
        self._used: dict[str, int] = {}
        self._bytes: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def used(self, owner: str) -> int:
        return self._used.get(owner, 0)

    def used_bytes(self, owner: str) -> int:
        return self._bytes.get(owner, 0)

    def fits_bytes(self, owner: str, nbytes: int) -> bool:
        """Whether a step of ``nbytes`` fits ``owner``'s byte bound now: its bytes fit what is
        left, or nothing of ``owner``'s is unanswered (a step larger than the bound runs alone)."""
        return self._bytes.get(owner, 0) + nbytes <= self.byte_limit or not self._used.get(owner)

    def admits(self, owner: str, nbytes: int = 0) -> bool:
        """Whether one more step of ``nbytes`` fits both of ``owner``'s bounds now."""
        return self._used.get(owner, 0) < self.limit and self.fits_bytes(owner, nbytes)

    async def room(self, owner: str, nbytes: int = 0) -> None:
        """Return once ``owner`` has fewer than ``limit`` steps unanswered and a step of
        ``nbytes`` fits its byte bound (:meth:`admits`)."""
        while not self.admits(owner, nbytes):
            waiter = self._waiters.get(owner)
            if waiter is None:
                waiter = self._waiters[owner] = asyncio.Event()
            await waiter.wait()

    def take(self, owner: str, steps: int, nbytes: int = 0) -> None:
        """``steps`` more of ``owner``'s steps, ``nbytes`` together, were handed to the engine."""
        self._used[owner] = self._used.get(owner, 0) + steps
        if nbytes:
            self._bytes[owner] = self._bytes.get(owner, 0) + nbytes

    def give(self, owner: str, steps: int, nbytes: int = 0) -> None:
        """``steps`` of ``owner``'s steps, ``nbytes`` together, were answered (or dropped)."""
        if steps <= 0:
            return
        left = self._used.get(owner, 0) - steps
        if left > 0:
            self._used[owner] = left
            left_bytes = self._bytes.get(owner, 0) - nbytes
            if left_bytes > 0:
                self._bytes[owner] = left_bytes
            else:
                self._bytes.pop(owner, None)
        else:
            self._used.pop(owner, None)
            self._bytes.pop(owner, None)
            left_bytes = 0
        # Wake the owner's waiters when there is room under both bounds; each checks again
        # whether its step fits (one waiting for many bytes may wait on).
        if left < self.limit and left_bytes < self.byte_limit:
            waiter = self._waiters.pop(owner, None)
            if waiter is not None:
                waiter.set()
