"""Sessions and their state slabs: the one place that creates, changes and ends a session.

Each model version owns one preallocated slab per state pair, shaped
``(max_sessions, *per_session_shape)``: the batch axis is moved first, so a batch's state
is one gather and one scatter; the slabs live in host or device memory (:mod:`.slabs`).
A session is a slot in its model's slabs plus a small record. Nothing outside this module
writes a :class:`Session`'s fields except the batcher's commit (position and retry entry,
after a whole batch succeeded).

Sessions are keyed by ``(owner, id)``: a client-chosen id names a session within its owner's
namespace only, so two identities may use the same id independently, and nothing a caller is
told (ALREADY_EXISTS included) depends on another identity's ids.

Ids of ended sessions are remembered (bounded, oldest forgotten first) so a late call can be
told whether the session expired, was evicted or was closed. The store knows nothing of gRPC,
protobuf or the event loop; every call names the caller's identity (``owner``) explicitly.
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from .. import errors
from ..errors import RnnserveError
from ..repository import ModelVersion
from .slabs import DeviceSlabs, HostSlabs, StateMemory

#: A valid session id, matched whole (``fullmatch``: ``$`` would also match before a final
#: newline).
SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: How the store keys a session: (owner, session id).
Key = tuple[str, str]
ENDED_MEMORY = 100_000
_WHAT = {
    errors.SESSION_EXPIRED: "expired (idle timeout)",
    errors.SESSION_EVICTED: "was evicted to make room",
    errors.SESSION_CLOSED: "was closed",
}


@dataclass(slots=True, frozen=True)
class Retry:
    """What a safe retry of a session's last step is answered with (arrays, no protobuf);
    ``outputs`` hold one row each, batch axis first, as an :class:`~.batcher.Outcome`'s do."""

    prev_position: int
    digest: bytes
    position: int
    outputs: dict[str, np.ndarray]


@dataclass(slots=True, frozen=True)
class SessionInfo:
    """What a caller may see of a session (crosses the engine <-> frontend pipe)."""

    session_id: str
    model: str
    version: str
    position: int
    create_time: float
    last_use_time: float


@dataclass(slots=True, eq=False)
class Session:
    """One open session: where its state lives and what its last step answered."""

    id: str
    model: ModelVersion
    slot: int
    position: int
    owner: str
    create_time: float
    last_use_time: float
    last_use: float  # monotonic, for the idle timeout
    generation: int = 0  # bumped by reset and end: a queued step then does not apply
    busy: int = 0  # steps queued or running, and calls holding it: it neither expires nor parks
    retry: Retry | None = None
    ended: str = ""  # the reason it ended, once it has

    @property
    def key(self) -> Key:
        """The store's key of this session: ids are namespaced by owner."""
        return (self.owner, self.id)

    def touch(self) -> None:
        self.last_use = time.monotonic()
        self.last_use_time = time.time()

    def info(self) -> SessionInfo:
        return SessionInfo(
            self.id,
            self.model.name,
            self.model.version,
            self.position,
            self.create_time,
            self.last_use_time,
        )


SLAB_KINDS = ("auto", "host", "device")


def state_memory(model: ModelVersion, kind: str = "auto") -> StateMemory:
    """The state slabs of ``model``: ``device`` memory (OrtValues on the session's device),
    ``host`` memory (numpy), or ``auto``: device memory on CUDA, host memory on CPU (where
    numpy's gather and scatter measured faster than onnxruntime's, docs/server.md).

    ``auto`` keeps host memory for a CUDA session whose recurrent nodes all run on the CPU
    (a peephole LSTM, the paper's GRU: cuDNN has neither): its state goes to the CPU node on
    every step anyway, and on an H200 plain runs with host slabs beat device slabs by 10-50 %.
    """
    if kind not in SLAB_KINDS:
        raise ValueError(f"slabs must be one of {SLAB_KINDS}, got {kind!r}")
    n = model.config.limits.max_sessions
    runner = model.runner
    device = runner.device if runner is not None else "cpu"
    state_on_cpu = model.recurrent_provider == "CPUExecutionProvider"
    if kind == "device" or (kind == "auto" and device != "cpu" and not state_on_cpu):
        providers = runner.providers if runner is not None else ["CPUExecutionProvider"]
        return DeviceSlabs(model.config, n, device, providers)
    return HostSlabs(model.config, n)


@dataclass(eq=False)
class Slabs:
    """The state slabs (``memory``) and slot bookkeeping of one model version."""

    model: ModelVersion
    memory: StateMemory
    free: list[int] = field(default_factory=list)
    lru: OrderedDict[Key, Session] = field(default_factory=OrderedDict)
    #: Slots taken off ``free`` for a session opened later (:meth:`SessionStore.reserve`):
    #: only these may be handed to :meth:`SessionStore.open` or :meth:`SessionStore.release`.
    reserved: set[int] = field(default_factory=set)

    @classmethod
    def allocate(cls, model: ModelVersion, kind: str = "auto") -> Slabs:
        n = model.config.limits.max_sessions
        return cls(model, state_memory(model, kind), list(range(n - 1, -1, -1)))

    def write(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        """Set a slot's state: given pairs copied in, the others zeroed (no leaks)."""
        self.memory.write(slot, state)

    def read(self, slot: int) -> dict[str, np.ndarray]:
        """A host copy of a slot's state (export, fork, park, snapshot)."""
        return self.memory.read(slot)


Listener = Callable[[str, Session], None]


def check_position(position: int, field_name: str) -> None:
    if not 0 <= position <= errors.MAX_POSITION:
        raise errors.invalid_request(
            f"{field_name} {position} is outside 0..{errors.MAX_POSITION}", field_name
        )


def check_session_id(session_id: str, field_name: str) -> None:
    if not SESSION_ID.fullmatch(session_id):
        shown = session_id if len(session_id) <= 64 else session_id[:64] + "..."
        raise errors.invalid_request(
            f"{field_name} {shown!r}: 1-128 characters of [A-Za-z0-9._:-]", field_name
        )


class SessionStore:
    """Every resident session of every model version, by (owner, id)."""

    def __init__(
        self,
        models: list[ModelVersion],
        on_event: Listener | None = None,
        max_sessions_per_identity: int = 0,
        slabs: str = "auto",
    ) -> None:
        self._quota = max_sessions_per_identity
        self._per_owner: dict[str, int] = {}
        self._sessions: dict[Key, Session] = {}
        #: Resident sessions by key, to read (the engine's submit looks its steps' sessions up
        #: here; :meth:`get` is the lookup that also expires and explains).
        self.sessions: Mapping[Key, Session] = self._sessions
        self._ended: OrderedDict[Key, str] = OrderedDict()
        self._slab_kind = slabs
        self._slabs: dict[str, Slabs] = {mv.key: Slabs.allocate(mv, slabs) for mv in models}
        self._on_event = on_event or (lambda event, session: None)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def slabs(self, model: ModelVersion) -> Slabs:
        return self._slabs[model.key]

    def count(self, model: ModelVersion) -> int:
        slabs = self._slabs.get(model.key)
        return 0 if slabs is None else len(slabs.lru)

    def slots_in_use(self, model: ModelVersion) -> int:
        """Slots of ``model`` taken: resident sessions, and sessions on their way in or out
        (reserved for one being brought back, or held by one being parked). A version is
        free to release only at 0: its slabs are still written to otherwise."""
        slabs = self._slabs.get(model.key)
        return 0 if slabs is None else model.config.limits.max_sessions - len(slabs.free)

    # -- model versions coming and going ------------------------------------------------------
    def add_model(self, model: ModelVersion) -> None:
        """Allocate the slabs of a version loaded while the server runs."""
        if model.key not in self._slabs:
            self._slabs[model.key] = Slabs.allocate(model, self._slab_kind)

    def remove_model(self, model: ModelVersion) -> None:
        """Free the slabs of a version that has no session left (it was retired)."""
        slabs = self._slabs.get(model.key)
        if slabs is not None and self.slots_in_use(model):
            raise ValueError(f"{model.key} still has {self.slots_in_use(model)} slots in use")
        self._slabs.pop(model.key, None)

    def move(self, session: Session, target: ModelVersion) -> None:
        """Carry ``session``'s state into a slot of ``target``'s slabs (the caller checked
        that both declare the same state pairs); its id, owner and position stay.

        The new slot is taken before anything changes, so a full target leaves the session
        where it was. The generation is bumped: nothing queued earlier can apply.
        """
        state = self.export(session)
        slot = self._free_slot(target, session.owner)
        source = self._slabs[session.model.key]
        self._slabs[target.key].write(slot, state)
        del source.lru[session.key]
        source.free.append(session.slot)
        self._on_event("move_out", session)  # gone from its old version, not yet on the new
        session.model = target
        session.slot = slot
        session.generation += 1
        self._slabs[target.key].lru[session.key] = session
        session.touch()
        self._on_event("move_in", session)

    # -- lookup ------------------------------------------------------------------------------
    def get(self, session_id: str, owner: str) -> Session:
        """The caller's open session; NOT_FOUND with a reason saying why not.

        Another identity's session, and an id another identity's session once had, answer
        exactly like an id never used: nothing tells one caller about another's sessions.
        """
        session = self._sessions.get((owner, session_id))
        if session is not None and not self.expired(session):
            return session
        raise self.not_found(session_id, owner)

    def expired(self, session: Session) -> bool:
        """Whether ``session`` is past its idle timeout, ending it if so: every lookup for a
        call checks this, so a session does not outlive its timeout until the reaper's round."""
        ttl = session.model.config.limits.idle_timeout_s
        if session.busy == 0 and time.monotonic() - session.last_use > ttl:
            self._end(session, errors.SESSION_EXPIRED, "expire")
            return True
        return False

    def not_found(self, session_id: str, owner: str) -> RnnserveError:
        reason = self._ended.get((owner, session_id), errors.SESSION_NOT_FOUND)
        shown = session_id if len(session_id) <= 64 else session_id[:64] + "..."
        what = _WHAT.get(reason, "does not exist")
        return RnnserveError(
            grpc.StatusCode.NOT_FOUND,
            reason,
            f"session {shown!r} {what}",
            metadata={"session_id": shown},
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def open(
        self,
        model: ModelVersion,
        session_id: str,
        state: Mapping[str, np.ndarray] | None,
        position: int,
        owner: str,
        event: str = "open",
        slot: int | None = None,
    ) -> Session:
        """A new session in a free slot, its state set from ``state`` (zeros elsewhere).

        ``slot`` is one taken earlier with :meth:`reserve` or :meth:`make_room` for this very
        model (parking made room for it); the caller hands it back with :meth:`release` if
        this raises. A slot that is not reserved in ``model``'s slabs (another version's, or
        one in use) is refused before anything is written: writing it would overwrite
        another session's state.
        """
        if session_id:
            check_session_id(session_id, "session_id")
            if (owner, session_id) in self._sessions:
                raise RnnserveError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    errors.SESSION_EXISTS,
                    f"session {session_id!r} already exists",
                )
        else:
            session_id = uuid.uuid4().hex
        self.check_open(owner, position)
        slabs = self._slabs[model.key]
        if slot is None:
            slot = self._free_slot(model, owner)
        elif slot in slabs.reserved:
            slabs.reserved.discard(slot)
        else:
            raise ValueError(f"slot {slot} is not reserved in the slabs of {model.key}")
        slabs.write(slot, state or {})
        now = time.time()
        session = Session(session_id, model, slot, position, owner, now, now, time.monotonic())
        self._per_owner[owner] = self._per_owner.get(owner, 0) + 1
        self._sessions[session.key] = session
        slabs.lru[session.key] = session
        self._ended.pop(session.key, None)
        self._on_event(event, session)
        return session

    def check_open(self, owner: str, position: int = 0) -> None:
        """Refuse a new session of ``owner`` starting at ``position`` that no room made for
        it would let open (a position out of range, the identity at its quota).

        :meth:`open` checks this too; a caller that makes room first (parking the least
        recently used session, whoever owns it) checks it before, so that a call refused
        anyway leaves every other session where it was."""
        check_position(position, "initial_position")
        if self._quota and self._per_owner.get(owner, 0) >= self._quota:
            raise RnnserveError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                errors.QUOTA_EXCEEDED,
                f"identity {owner!r} has its limit of {self._quota} open sessions",
            )

    def make_room(self, model: ModelVersion, owner: str) -> int:
        """A slot of ``model`` reserved for ``owner``'s session opened later, as :meth:`reserve`
        but applying the ``on_full`` policy if none is free."""
        slot = self._free_slot(model, owner)
        self._slabs[model.key].reserved.add(slot)
        return slot

    def _free_slot(self, model: ModelVersion, owner: str) -> int:
        """A free slot of ``model`` for ``owner``, taken now: the ``on_full`` policy applies if
        none is free (refuse, or evict the session :meth:`_victim` picks)."""
        slabs = self._slabs[model.key]
        if not slabs.free:
            limits = model.config.limits
            victim = self._victim(slabs, owner) if limits.on_full == "evict_lru" else None
            if victim is None:
                raise RnnserveError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    errors.CAPACITY_REACHED,
                    f"model {model.key} is at its limit of {limits.max_sessions} sessions",
                )
            self._end(victim, errors.SESSION_EVICTED, "evict")
        return slabs.free.pop()

    def _victim(self, slabs: Slabs, owner: str) -> Session | None:
        """Whom ``evict_lru`` evicts to make room for ``owner``: its own least recently used
        idle session; else the least recently used idle one of whichever identity holds the
        most sessions, if that is more than ``owner`` holds. One identity opening sessions
        thus evicts its own once it is the largest, never everyone else's."""
        idle = [s for s in slabs.lru.values() if s.busy == 0]
        for session in idle:
            if session.owner == owner:
                return session
        mine = self._per_owner.get(owner, 0)
        heaviest = max(
            (s for s in idle if self._per_owner.get(s.owner, 0) > mine),
            key=lambda s: self._per_owner.get(s.owner, 0),
            default=None,
        )
        return heaviest

    def close(self, session: Session) -> None:
        self._end(session, errors.SESSION_CLOSED, "close")

    def evict(self, session: Session) -> None:
        """End ``session`` as the server's choice, not its client's (``evict``)."""
        self._end(session, errors.SESSION_EVICTED, "evict")

    def reset(self, session: Session, state: Mapping[str, np.ndarray]) -> None:
        self._slabs[session.model.key].write(session.slot, state)
        session.position = 0
        session.generation += 1
        session.retry = None
        session.touch()
        self._on_event("reset", session)

    def export(self, session: Session) -> dict[str, np.ndarray]:
        return self._slabs[session.model.key].read(session.slot)

    def expire_idle(self) -> int:
        """End every idle session past its model's timeout; how many ended."""
        return sum(self.expired(session) for session in list(self._sessions.values()))

    def _end(self, session: Session, reason: str, event: str) -> None:
        slabs = self._slabs[session.model.key]
        del self._sessions[session.key]
        del slabs.lru[session.key]
        session.ended = reason
        self._per_owner[session.owner] -= 1
        session.generation += 1
        slabs.free.append(session.slot)
        self.note_ended(session.id, reason, session.owner)
        self._on_event(event, session)

    # -- residency (parking in a state store) -----------------------------------------------
    def is_resident(self, session_id: str, owner: str) -> bool:
        """Whether ``owner``'s session ``session_id`` has its state in a slab here."""
        return (owner, session_id) in self._sessions

    def named(self, session_id: str) -> list[Session]:
        """Every resident session with this id, whoever owns it (an admin's lookup)."""
        return [s for (_, sid), s in self._sessions.items() if sid == session_id]

    def resident(self, session_id: str, owner: str) -> Session | None:
        """``owner``'s resident session with this id (no expiry check)."""
        return self._sessions.get((owner, session_id))

    def ended_reason(self, session_id: str, owner: str) -> str | None:
        """Why ``owner``'s session that lived here ended, if this store remembers it."""
        return self._ended.get((owner, session_id))

    def note_ended(self, session_id: str, reason: str, owner: str) -> None:
        """Remember that a session ended (here, or while parked)."""
        self._ended[(owner, session_id)] = reason
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)

    def reserve(self, model: ModelVersion) -> int | None:
        """Take a free slot of ``model`` for a session opened later, or None if none is free."""
        slabs = self._slabs[model.key]
        if not slabs.free:
            return None
        slot = slabs.free.pop()
        slabs.reserved.add(slot)
        return slot

    def release(self, model: ModelVersion, slot: int) -> None:
        """Give back a slot taken with :meth:`reserve` or :meth:`make_room` (and not opened);
        a slot not reserved in ``model``'s slabs is refused (freeing it would let two
        sessions share it)."""
        slabs = self._slabs[model.key]
        if slot not in slabs.reserved:
            raise ValueError(f"slot {slot} is not reserved in the slabs of {model.key}")
        slabs.reserved.discard(slot)
        slabs.free.append(slot)

    def idle(self, idle_s: float) -> list[Session]:
        """Sessions with nothing queued and unused for longer than ``idle_s`` seconds."""
        cutoff = time.monotonic() - idle_s
        return [s for s in self._sessions.values() if s.busy == 0 and s.last_use < cutoff]

    @contextlib.contextmanager
    def held(self, session: Session) -> Iterator[None]:
        """Keep ``session`` from expiring or being parked while a call awaits something."""
        session.busy += 1
        try:
            yield
        finally:
            session.busy -= 1

    def least_recent_idle(self, model: ModelVersion) -> Session | None:
        """The least recently used session of ``model`` with nothing queued, if any."""
        for session in self._slabs[model.key].lru.values():
            if session.busy == 0:
                return session
        return None

    def detach(self, session: Session) -> None:
        """Take a session out of the lookup while it is parked; its slot stays taken.

        The generation is bumped so that nothing queued earlier could scatter into the slot.
        The caller either :meth:`reattach`-es it (parking failed) or calls :meth:`parked`
        (parking succeeded). No event yet: the session has not left until its state is in
        the store, and a listener that acted on "park" now (a retiring version released
        once its last session left) would pull the slabs from under the park.
        """
        del self._sessions[session.key]
        del self._slabs[session.model.key].lru[session.key]
        self._per_owner[session.owner] -= 1
        session.generation += 1

    def parked(self, session: Session) -> None:
        """A detached session's state is in the store: free its slot, then say it left."""
        self._slabs[session.model.key].free.append(session.slot)
        self._on_event("park", session)

    def reattach(self, session: Session, *, recent: bool = False) -> None:
        """Put a detached session back where it was (its parking failed; least recently
        used), or as the most recently used (``recent``: it was detached right after it came
        back, until its move was confirmed); as it never left, no event."""
        self._sessions[session.key] = session
        lru = self._slabs[session.model.key].lru
        lru[session.key] = session
        lru.move_to_end(session.key, last=recent)
        self._per_owner[session.owner] = self._per_owner.get(session.owner, 0) + 1

    def export_all(self) -> list[tuple[Session, dict[str, np.ndarray]]]:
        """Every open session with a copy of its state (snapshots, drains)."""
        return [(s, self.export(s)) for s in self._sessions.values()]
