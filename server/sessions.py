"""Sessions and their state slabs.

Each model version owns one preallocated slab per state pair, shaped
``(max_sessions, *per_session_shape)``: the batch axis is moved first, so a batch's state
is one fancy-index gather (``slab[slots]``) and one scatter back. A session is a slot in
those slabs plus its position and the stored reply of its last step (for safe retry).

Ids of ended sessions are remembered (bounded, oldest forgotten first) so a late call can be
told whether the session expired, was evicted or was closed. The store has no gRPC or event
loop in it; :meth:`SessionStore.export_all` / :meth:`SessionStore.import_session` let
snapshots move every session.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb

from . import errors
from .config import DTYPES
from .errors import RnnserveError
from .repository import ModelVersion, Repository

logger = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ENDED_MEMORY = 100_000


@dataclass(eq=False)
class Session:
    """One open session: where its state lives and what it last answered."""

    id: str
    model: ModelVersion
    slot: int
    position: int
    create_time: float
    last_use_time: float
    last_use: float  # monotonic, for the idle timeout
    generation: int = 0  # bumped by reset and close: a running step must not scatter then
    pending: int = 0  # steps queued or running; such a session does not expire
    prev_position: int = -1
    last_digest: bytes = b""
    last_reply: pb.StepResponse | None = None
    closed: bool = False
    end_reason: str = ""
    owner: str = "anonymous"  # the identity that opened it; others cannot see it

    def touch(self) -> None:
        self.last_use = time.monotonic()
        self.last_use_time = time.time()

    def describe(self) -> pb.Session:
        message = pb.Session(
            session_id=self.id,
            model=self.model.name,
            version=self.model.version,
            position=self.position,
        )
        message.create_time.FromNanoseconds(int(self.create_time * 1e9))
        message.last_use_time.FromNanoseconds(int(self.last_use_time * 1e9))
        return message


@dataclass(eq=False)
class Slabs:
    """The state slabs and slot bookkeeping of one model version."""

    model: ModelVersion
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    lru: OrderedDict[str, Session] = field(default_factory=OrderedDict)

    @classmethod
    def allocate(cls, model: ModelVersion) -> Slabs:
        n = model.config.limits.max_sessions
        arrays = {
            s.input: np.zeros((n, *s.session_shape), DTYPES[s.dtype]) for s in model.config.states
        }
        return cls(model, arrays, list(range(n - 1, -1, -1)))

    def write(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        """Set a slot's state: given pairs copied in, the others zeroed (no leaks)."""
        for name, slab in self.arrays.items():
            value = state.get(name)
            if value is None:
                slab[slot] = 0
            else:
                slab[slot] = value

    def read(self, slot: int) -> dict[str, np.ndarray]:
        return {name: slab[slot].copy() for name, slab in self.arrays.items()}


Listener = Callable[[str, Session], None]


class SessionStore:
    """Every open session of every model version, by id."""

    def __init__(
        self,
        repository: Repository,
        on_event: Listener | None = None,
        identity: Callable[[], str] = lambda: "anonymous",
        max_sessions_per_identity: int = 0,
    ) -> None:
        self._identity = identity
        self._quota = max_sessions_per_identity
        self._per_owner: dict[str, int] = {}
        self._sessions: dict[str, Session] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._slabs: dict[str, Slabs] = {mv.key: Slabs.allocate(mv) for mv in repository.all()}
        self._on_event = on_event or (lambda event, session: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def slabs(self, model: ModelVersion) -> Slabs:
        return self._slabs[model.key]

    def count(self, model: ModelVersion) -> int:
        return len(self._slabs[model.key].lru)

    # -- lookup ------------------------------------------------------------------------------
    def get(self, session_id: str) -> Session:
        """The open session; NOT_FOUND with a reason saying why not."""
        session = self._sessions.get(session_id)
        if session is not None and session.owner != self._identity():
            # Another identity's session is invisible rather than forbidden.
            raise RnnserveError(
                grpc.StatusCode.NOT_FOUND,
                errors.SESSION_NOT_FOUND,
                f"session {session_id!r} does not exist",
            )
        if session is not None:
            ttl = session.model.config.limits.idle_timeout_s
            if session.pending == 0 and time.monotonic() - session.last_use > ttl:
                self._end(session, errors.SESSION_EXPIRED, "expire")
            else:
                return session
        reason = self._ended.get(session_id, errors.SESSION_NOT_FOUND)
        what = {
            errors.SESSION_EXPIRED: "expired (idle timeout)",
            errors.SESSION_EVICTED: "was evicted to make room",
            errors.SESSION_CLOSED: "was closed",
        }.get(reason, "does not exist")
        raise RnnserveError(grpc.StatusCode.NOT_FOUND, reason, f"session {session_id!r} {what}")

    # -- lifecycle ---------------------------------------------------------------------------
    def open(
        self,
        model: ModelVersion,
        session_id: str = "",
        state: Mapping[str, np.ndarray] | None = None,
        position: int = 0,
        event: str = "open",
        owner: str | None = None,
        slot: int | None = None,
    ) -> Session:
        """A new session in a free slot, its state set from ``state`` (zeros elsewhere).

        ``slot`` is one taken earlier with :meth:`reserve` (parking made room for it); the
        caller hands it back with :meth:`release` if this raises.
        """
        if session_id:
            if not _ID.match(session_id):
                raise errors.invalid(
                    f"session id {session_id!r}: 1-128 characters of [A-Za-z0-9._:-]",
                    "session_id",
                )
            if session_id in self._sessions:
                raise RnnserveError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    errors.SESSION_EXISTS,
                    f"session {session_id!r} already exists",
                )
        else:
            session_id = uuid.uuid4().hex
        if position < 0:
            raise errors.invalid("initial_position must be >= 0", "initial_position")
        owner = self._identity() if owner is None else owner
        if self._quota and self._per_owner.get(owner, 0) >= self._quota:
            raise RnnserveError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                errors.QUOTA_EXCEEDED,
                f"identity {owner!r} has its limit of {self._quota} open sessions",
            )
        slabs = self._slabs[model.key]
        if slot is None:
            if not slabs.free:
                self._make_room(slabs)
            slot = slabs.free.pop()
        slabs.write(slot, state or {})
        now = time.time()
        session = Session(session_id, model, slot, position, now, now, time.monotonic())
        session.owner = owner
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        self._sessions[session_id] = session
        slabs.lru[session_id] = session
        self._ended.pop(session_id, None)
        self._on_event(event, session)
        return session

    def _make_room(self, slabs: Slabs) -> None:
        limits = slabs.model.config.limits
        if limits.on_full == "evict_lru":
            for victim in slabs.lru.values():
                if victim.pending == 0:
                    self._end(victim, errors.SESSION_EVICTED, "evict")
                    return
        raise RnnserveError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            errors.CAPACITY_REACHED,
            f"model {slabs.model.key} is at its limit of {limits.max_sessions} sessions",
        )

    def make_room(self, model: ModelVersion) -> int:
        """A free slot of ``model`` taken now: the ``on_full`` policy applies if none is."""
        slabs = self._slabs[model.key]
        if not slabs.free:
            self._make_room(slabs)
        return slabs.free.pop()

    def close(self, session_id: str) -> None:
        self._end(self.get(session_id), errors.SESSION_CLOSED, "close")

    def fork(self, session_id: str, new_session_id: str = "", slot: int | None = None) -> Session:
        source = self.get(session_id)
        state = self._slabs[source.model.key].read(source.slot)
        return self.open(
            source.model, new_session_id, state, source.position, event="fork", slot=slot
        )

    def reset(self, session_id: str, state: Mapping[str, np.ndarray]) -> Session:
        session = self.get(session_id)
        self._slabs[session.model.key].write(session.slot, state)
        session.position = 0
        session.generation += 1
        session.last_reply = None
        session.prev_position = -1
        session.touch()
        self._on_event("reset", session)
        return session

    def export(self, session: Session) -> dict[str, np.ndarray]:
        return self._slabs[session.model.key].read(session.slot)

    def used(self, session: Session) -> None:
        """Mark a session recently used (LRU order and idle clock)."""
        session.touch()
        self._slabs[session.model.key].lru.move_to_end(session.id)

    def is_live(self, session: Session, generation: int) -> bool:
        return not session.closed and session.generation == generation

    def expire_idle(self) -> int:
        """End every idle session past its model's timeout; how many ended."""
        now = time.monotonic()
        ended = 0
        for session in list(self._sessions.values()):
            ttl = session.model.config.limits.idle_timeout_s
            if session.pending == 0 and now - session.last_use > ttl:
                self._end(session, errors.SESSION_EXPIRED, "expire")
                ended += 1
        return ended

    def _end(self, session: Session, reason: str, event: str) -> None:
        slabs = self._slabs[session.model.key]
        del self._sessions[session.id]
        del slabs.lru[session.id]
        session.closed = True
        session.end_reason = reason
        self._per_owner[session.owner] -= 1
        session.generation += 1
        slabs.free.append(session.slot)
        self._ended[session.id] = reason
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)
        self._on_event(event, session)

    # -- residency (parking in a state store) -----------------------------------------------
    def is_resident(self, session_id: str) -> bool:
        """Whether the session's state is in a slab here (whoever owns it)."""
        return session_id in self._sessions

    def resident(self, session_id: str) -> Session | None:
        """The resident session with this id, whoever owns it (no expiry check)."""
        return self._sessions.get(session_id)

    def ended_reason(self, session_id: str) -> str | None:
        """Why a session that lived here ended, if this store remembers it."""
        return self._ended.get(session_id)

    def note_ended(self, session_id: str, reason: str) -> None:
        """Remember that a session not resident here ended (e.g. expired while parked)."""
        self._ended[session_id] = reason
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def reserve(self, model: ModelVersion) -> int | None:
        """Take a free slot of ``model`` for a session opened later, or None if none is free."""
        free = self._slabs[model.key].free
        return free.pop() if free else None

    def release(self, model: ModelVersion, slot: int) -> None:
        """Give back a slot taken with :meth:`reserve` or :meth:`detach`."""
        self._slabs[model.key].free.append(slot)

    def idle(self, idle_s: float) -> list[Session]:
        """Sessions with nothing queued and unused for longer than ``idle_s`` seconds."""
        cutoff = time.monotonic() - idle_s
        return [s for s in self._sessions.values() if s.pending == 0 and s.last_use < cutoff]

    @contextlib.contextmanager
    def held(self, session: Session) -> Iterator[None]:
        """Keep ``session`` from expiring or being parked while a call awaits something."""
        session.pending += 1
        try:
            yield
        finally:
            session.pending -= 1

    def least_recent_idle(self, model: ModelVersion) -> Session | None:
        """The least recently used session of ``model`` with nothing queued, if any."""
        for session in self._slabs[model.key].lru.values():
            if session.pending == 0:
                return session
        return None

    def detach(self, session: Session) -> None:
        """Take a session out of the lookup while it is parked; its slot stays taken.

        The generation is bumped so that nothing queued earlier could scatter into the slot.
        The caller either :meth:`reattach`-es it (parking failed) or :meth:`release`-s or
        reuses the slot (parking succeeded).
        """
        del self._sessions[session.id]
        del self._slabs[session.model.key].lru[session.id]
        self._per_owner[session.owner] -= 1
        session.generation += 1
        self._on_event("park", session)

    def reattach(self, session: Session) -> None:
        """Put a detached session back where it was (its parking failed)."""
        self._sessions[session.id] = session
        lru = self._slabs[session.model.key].lru
        lru[session.id] = session
        lru.move_to_end(session.id, last=False)
        self._per_owner[session.owner] = self._per_owner.get(session.owner, 0) + 1
        self._on_event("unpark", session)

    # -- moving sessions (snapshots, drains) -------------------------------------------------
    def export_all(self) -> list[tuple[Session, dict[str, np.ndarray]]]:
        """Every open session with a copy of its state."""
        return [(s, self.export(s)) for s in self._sessions.values()]

    def import_session(
        self,
        model: ModelVersion,
        session_id: str,
        state: Mapping[str, np.ndarray],
        position: int,
        owner: str = "anonymous",
        slot: int | None = None,
        event: str = "restore",
    ) -> Session:
        return self.open(model, session_id, state, position, event=event, owner=owner, slot=slot)
