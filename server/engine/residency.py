"""Parking sessions in a state store, and taking them back, without a client noticing.

With ``--state-store`` a session leaves its slab slot for the store when

- it has been idle longer than ``--park-after-s`` (the reaper parks it),
- its model's slab is full and a new or returning session needs a slot (the least recently
  used idle session is parked, instead of refusing or evicting), or
- the replica drains (every session is handed off to the store for another replica).

Any call that names a session not resident here first asks the store for it and, if it is
there and belongs to the caller, takes it out atomically and restores it into a slot; only
then does the call go on (a step is queued only once its state is back, whole). While a
session moves, calls for it wait for the move to finish, so a step never runs on stale state
and nothing is taken twice.

A session resident on another replica is *called back*: the store names its holder, which is
asked to park it (a release), and this replica takes it once it is parked. That is what lets
sessions follow a load balancer's ring when it changes (a replica back from a rolling
restart, a replica added): without it they would be "not found" on the replica the ring now
names while resident on the one it named before.

A client-chosen id is claimed in the store before it is opened (or forked to), in one atomic
step that refuses it while it is parked, moving or held by another running replica, and
otherwise names this replica its holder: of two replicas asked to open one id at the same
moment exactly one does, and the other answers ALREADY_EXISTS. Each claim carries a token: a
claim this replica cannot stand by (its reply lost, or the open failed after it) is taken
back by that token, which deletes only the record that claim wrote and voids the claim, so
that if it was held up on its way and lands after, it claims nothing.

Sessions restored from a snapshot at start claim their ids the same way
(:meth:`Parking.restore_claimed`): held by this process from then on, so other replicas call
them back; one whose id the store has already (opened elsewhere while this replica was down,
or parked after the snapshot was written) is the store's newer copy, and is not restored.

Sessions parked to come back here (idle, or to make room; not those handed off by a drain or
released to another replica) keep their model version loaded while it retires, as resident
ones do (:meth:`Parking.keeping`): their clients come back to the version they opened. A
session parked on a version that is not loaded here answers FAILED_PRECONDITION
(``VERSION_NOT_FOUND``, saying when that version was retired and released here) and is left
in the store; only a MoveSession restores it onto another version (``rehome``).

The store being down never stops resident sessions: parking is skipped (on a full slab the
model's ``on_full`` policy applies) and calls for parked sessions answer UNAVAILABLE with
the reason ``STATE_STORE_UNAVAILABLE``, their state untouched in the store.

A park or a take whose reply is lost (the store ran it, or not) is never guessed at: each
carries a token, and the replica asks the store what became of it (:mod:`.state_store`).

- A park is settled at once: written, the session has left; not written, it stays resident
  (and never will be written). If the store cannot say, the session waits here, detached in
  its slot and served to no one (UNAVAILABLE, ``STATE_STORE_UNAVAILABLE``), until it can: on
  its next call, a release asked by another replica, or the next reaper round. Serving it
  meanwhile could make it live twice: here, and from the copy the park may have written.
  Not written, but its id held by another replica by now (opened there while this one
  could not be reached), it ends here instead. A drain waits for the store's answer (up to
  ``handoff_wait_s``); what is still in doubt goes into the snapshot with its park's token,
  and is settled against the store when the snapshot is restored.
- A take is asked again at once with its token, and returns what it took. If the store
  cannot say, the call answers UNAVAILABLE and the take stays open: the session's next call
  here asks again with the same token, and a release asked by another replica or the next
  reaper round gives the session back to the store. Meanwhile other replicas answer
  ``SESSION_MOVING``, never NOT_FOUND.
- A session taken is served only once its take is confirmed (one more round trip, after it
  is restored into its slot). A take not confirmed within its lease
  (:data:`~.state_store.TAKE_LEASE_S`) is taken over by the next replica that gets a call
  for the session: its taker died, drained or was cut off from the store, and never served
  it; its late confirmation fails, and it drops what it restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc

from .. import errors
from ..errors import RnnserveError
from ..metrics import Metrics
from ..repository import ModelVersion, Repository
from .persistence import PARK_TOKEN, PARKED_BY, Persistence
from .snapshot import SessionRecord, SnapshotError, decode_sessions, encode_sessions
from .state_store import (
    HOLDER_TTL_S,
    NOT_WRITTEN,
    READS,
    SUPERSEDED,
    TAKE_LEASE_S,
    WRITTEN,
    ParkedEntry,
    ParkedInfo,
    StateStore,
    StoreUnavailable,
)
from .store import SESSION_ID, Key, Session, SessionStore, check_session_id

logger = logging.getLogger(__name__)
STORE_UNAVAILABLE = errors.STATE_STORE_UNAVAILABLE
SESSION_MOVING = errors.SESSION_MOVING
#: How long a drain's "moving" marks stand if the drain never writes the sessions (it died).
_MOVING_TTL_S = 30.0
T = TypeVar("T")
_CHUNK = 256  # sessions written per round trip when parking many
_ROOM_WAIT_S = 5.0  # how long a call waits for a busy slab to have an idle session
_ROOM_POLL_S = 0.001
#: How long a replica waits for another to release a session it asked for, and how long a
#: releasing replica waits for the session's running steps to finish before it gives up.
_RELEASE_WAIT_S = 2.0
_RELEASE_POLL_S = 0.005
_HOLDER_TTL_S = HOLDER_TTL_S
_ENDED_EVENTS = frozenset({"close", "expire", "evict"})
_STOP_WAIT_S = 5.0  # how long a stop waits for moves in flight
_SUBSCRIBE_WAIT_S = 5.0  # how long a start waits for the release channel's subscription
#: Parks whose sessions are to come back to this replica (idle, or room made): a retiring
#: version waits for them as for resident ones. Those handed off (a drain) or released to
#: another replica are no longer this replica's to wait for.
_KEEPING_TRIGGERS = frozenset({"idle", "full"})
#: Given the key (``model:version``) of a version not loaded here that a parked session's
#: record names, the loaded version to restore the session onto instead (a MoveSession of
#: a session parked on a retired and released version): raises when it may not go there.
Rehome = Callable[[str], ModelVersion]


@dataclass(frozen=True)
class _Park:
    """One session's park: what was written, why (the metric's trigger), when and by which
    replica (``parker``); ``restored``: a park in doubt that a snapshot saved, taken up by
    this process."""

    session: Session
    entry: ParkedEntry
    trigger: str
    at: float  # time.monotonic()
    parker: str
    restored: bool = False


class Parking:
    """Moves sessions between the slabs of one server and a :class:`StateStore`."""

    def __init__(
        self,
        store: SessionStore,
        persistence: Persistence,
        repository: Repository,
        state: StateStore | None,
        metrics: Metrics,
        park_after_s: float | None = None,
        handoff_wait_s: float = 5.0,
        on_left: Callable[[ModelVersion], None] | None = None,
    ) -> None:
        self._store = store
        self._persistence = persistence
        self._repository = repository
        self._state = state
        self._metrics = metrics
        self._park_after_s = park_after_s
        #: How long a drain waits for a store in its pause after an error (its calls would
        #: fail at once) before it gives up handing sessions off.
        self._handoff_wait_s = handoff_wait_s
        # Keyed (owner, id) like the session store: ids are namespaced by owner.
        self._moving: dict[Key, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Sessions this server parked: model, and when their key expires in the store.
        self._parked: dict[Key, tuple[ModelVersion, float]] = {}
        # Those of them that keep their version loaded (parked to come back here, see
        # _KEEPING_TRIGGERS), how many per version (by id() of the ModelVersion, which
        # _parked holds), and who hears when one stops (a retiring version may be empty).
        self._kept: set[Key] = set()
        self._keeping: dict[int, int] = {}
        self._on_left = on_left
        # Resident sessions whose holder record the store missed (down when it was written).
        self._unheld: set[Key] = set()
        # Ids claimed here whose open did not follow (it failed, or the claim's reply was
        # lost) and whose claim the store could not take back yet, with the tokens of those
        # claims: taken back once it can (or by this replica's next claim of the id).
        self._unclaimed: dict[Key, set[str]] = {}
        # Set once a drain has marked its sessions moving: a session that becomes resident
        # after that (a call admitted before the drain gate closed, still taking it) is
        # marked too, so another replica asked for it says "retry", not "not found".
        self._draining = False
        # Parks whose reply was lost and that the store could not settle yet: their sessions
        # wait here, detached (in their slots), until it says whether they were written.
        self._doubt: dict[Key, _Park] = {}
        # Takes whose reply was lost (or whose session could not be restored): token and
        # what was peeked; asked again, or given back to the store.
        self._taking: dict[Key, tuple[str, ParkedInfo]] = {}
        # Takes done whose record the store did not drop yet: (owner, id, token).
        self._unfinished: set[tuple[str, str, str, bool]] = set()
        #: This replica's id in holder records and on its release channel (one per process).
        self.replica_id = uuid.uuid4().hex[:16]
        self._listener: asyncio.Task[None] | None = None
        # Set once the listener's first subscription is made, or has failed (the store down at
        # start: the server starts all the same).
        self._listener_tried = asyncio.Event()
        self._listener_failed = False
        # Snapshots save the sessions whose park is in doubt too, with the park's token.
        persistence.detached = self._detached

    def _detached(self) -> list[tuple[Session, dict[str, str]]]:
        return [
            (park.session, {PARK_TOKEN: park.entry.token, PARKED_BY: park.parker})
            for park in self._doubt.values()
        ]

    async def restore_claimed(self, records: Sequence[SessionRecord]) -> int:
        """Take up the sessions a snapshot saved as resident, each claiming its id in the store
        first, as an open does (:meth:`_claim_id`); how many were restored into slots.

        The process that saved them is gone, and with it the replica named in their holder
        records: restored silently, another replica asked for one would find no live holder,
        answer NOT_FOUND and let its client open the id again (one id, two sessions on two
        replicas). And the store may know the id better than the snapshot does: opened on
        another replica while this one was down, or parked after the snapshot was written.
        That copy is the newer one, so the snapshot's is not restored. With the store down
        they are restored all the same, as an open would be served, and held once it answers
        (:meth:`_rewrite_holders`)."""
        assert self._state is not None
        restored = 0
        for record in sorted(records, key=lambda r: r.last_use_time):
            session_id, owner = record.session_id, record.owner
            claimed: bool | None = None
            token = uuid.uuid4().hex
            try:
                claimed = await self._state.claim(
                    session_id, owner, self.replica_id, _HOLDER_TTL_S, token
                )
            except StoreUnavailable:
                pass
            if claimed is False:
                logger.warning(
                    "event=restore_superseded session=%s: the state store has this id already "
                    "(held by a running replica, parked or moving): its copy is newer than the "
                    "snapshot's, which is not restored",
                    session_id,
                )
                continue
            try:
                session = self._persistence.restore_one(record)
            except Exception as exc:  # one bad record must not stop the start
                logger.warning("event=restore_skipped session=%s why=%s", session_id, exc)
                if claimed:
                    await self._unclaim(session_id, owner, token)
                continue
            if claimed is None:
                self._unheld.add(session.key)  # held once the store answers (park_idle)
            restored += 1
        return restored

    async def restore_in_doubt(self, records: Sequence[SessionRecord]) -> int:
        """Take up sessions a snapshot saved while their park was in doubt (its reply lost,
        the store unable to say before the server stopped): each is restored into a slot,
        detached, and settled against the store before it is served. A park that was written
        lives in the store (or was taken from it since): the copy here is dropped. One that
        was not is resident here again. Until the store can say, they wait detached, as any
        park in doubt does. How many were restored into slots."""
        assert self._state is not None
        now = time.monotonic()
        restored: list[Key] = []
        for record in sorted(records, key=lambda r: r.last_use_time):
            try:
                session = self._persistence.restore_one(record)
            except Exception as exc:  # one bad record must not stop the start
                logger.warning("event=restore_skipped session=%s why=%s", record.session_id, exc)
                continue
            self._store.detach(session)
            entry = ParkedEntry(
                session.id,
                session.owner,
                session.model.key,
                b"",
                _time_left(session, now),
                record.extra[PARK_TOKEN],
            )
            parker = record.extra.get(PARKED_BY, "")
            self._doubt[session.key] = _Park(session, entry, "drain", now, parker, restored=True)
            restored.append(session.key)
        with self._claim(restored) as keys:
            try:
                await self._settle_parks(keys)
            except StoreUnavailable:
                logger.warning(
                    "event=park_in_doubt trigger=restore sessions=%d: the store cannot say yet "
                    "whether their parks were written; they wait until it can",
                    len(keys),
                )
        return len(restored)

    async def start(self) -> None:
        """Listen for other replicas' requests to release sessions held here, and wait (up
        to ``_SUBSCRIBE_WAIT_S``) until the listener is subscribed: until then other replicas
        take this one for gone, and would claim the ids of the sessions it restored at start.
        With the store down (the first subscription fails) the server starts all the same,
        and says so."""
        if self._state is not None and self._listener is None:
            self._metrics.replica_info.labels(self.replica_id).set(1)
            self._listener = asyncio.get_running_loop().create_task(self._listen())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listener_tried.wait(), _SUBSCRIBE_WAIT_S)
            if not self._listener_tried.is_set() or self._listener_failed:
                logger.warning(
                    "event=release_channel_not_ready: until the state store answers, other "
                    "replicas take this one for gone"
                )

    async def stop(self) -> None:
        """Stop taking release requests, then let every move in flight finish (a session
        taken from the store and not yet restored would otherwise miss the drain's handoff
        and be lost with this process); bounded, as a stop must be."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=_STOP_WAIT_S)

    @property
    def enabled(self) -> bool:
        return self._state is not None

    # -- taking sessions back ----------------------------------------------------------------
    async def ensure_resident(
        self, session_id: str, owner: str, rehome: Rehome | None = None
    ) -> None:
        """Bring ``session_id`` back from the store if it is parked there for the caller.

        Returns with the session resident, or with nothing to bring back (the caller's
        lookup then answers NOT_FOUND with its usual reason). Raises UNAVAILABLE when the
        store cannot be asked, NOT_FOUND when the session belongs to another identity,
        FAILED_PRECONDITION (VERSION_NOT_FOUND) when it is parked on a version not loaded
        here, unless ``rehome`` names one to restore it onto instead (a move).
        """
        if self._state is None or not session_id or self._store.is_resident(session_id, owner):
            return
        if not SESSION_ID.fullmatch(session_id):
            return  # no session has such an id: the lookup answers NOT_FOUND, the store unasked
        key = (owner, session_id)
        while (moving := self._moving.get(key)) is not None:
            await moving
            if self._store.is_resident(session_id, owner):
                return
        done = asyncio.get_running_loop().create_future()
        self._moving[key] = done

        def moved(_: object) -> None:
            del self._moving[key]
            done.set_result(None)

        # The session comes back pinned (``pending``), so that between the move's end and
        # this call resuming no other call parks it again to make room; the pin is dropped
        # right before the caller goes on, in the same turn of the loop as its own use.
        caller_gone = False
        pinned: list[Session] = []

        async def unpark() -> None:
            session = await self._bring_back(session_id, owner, rehome)
            if session is not None and not caller_gone:
                session.busy += 1
                pinned.append(session)

        try:
            await self._shielded(unpark(), moved)
        except BaseException:
            caller_gone = True
            raise
        finally:
            for session in pinned:
                session.busy -= 1

    async def _shielded(
        self, work: Coroutine[Any, Any, T], then: Callable[[object], None] | None = None
    ) -> T:
        """Run ``work`` to its end even if the call that wants it is cancelled.

        A move between slab and store must not stop halfway (a session taken from the store
        but not restored would be lost): the caller may go, the move finishes.
        """
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        if then is not None:
            task.add_done_callback(then)
        return await asyncio.shield(task)

    async def _bring_back(
        self, session_id: str, owner: str, rehome: Rehome | None = None
    ) -> Session | None:
        """``_unpark``, after settling a park of the session whose reply was lost (if that
        park was not written, the session is resident here again)."""
        key = (owner, session_id)
        if key in self._doubt:
            try:
                await self._settle_parks([key])
            except StoreUnavailable as exc:
                raise _unavailable(session_id, exc) from None
            session = self._store.resident(session_id, owner)
            if session is not None:
                return session
        return await self._unpark(session_id, owner, rehome)

    async def _unpark(
        self, session_id: str, owner: str, rehome: Rehome | None = None
    ) -> Session | None:
        """Take ``session_id`` from the store into a slot; the session, or None if absent."""
        assert self._state is not None
        started = time.perf_counter()
        key = (owner, session_id)
        pending = self._taking.get(key)
        if pending is not None:  # a take of it whose reply was lost: asked again
            token, taken = pending
            return await self._take_back(
                session_id, owner, token, taken, started, again=True, rehome=rehome
            )
        try:
            info = await self._state.peek(session_id, owner)
        except StoreUnavailable as exc:
            # Not "NOT_FOUND" even for an id that ended here: it may live on elsewhere
            # (reopened, or taken by another replica), which only the store can say.
            raise _unavailable(session_id, exc) from None
        if info is None:
            if await self._marked_moving(session_id, owner):
                raise RnnserveError(
                    grpc.StatusCode.UNAVAILABLE,
                    SESSION_MOVING,
                    f"session {session_id!r} is being handed off by a draining server; "
                    "retry shortly",
                    retry_after_s=_RETRY_AFTER_S,
                )
            # Even one that ended here may live on elsewhere now (reopened, or taken by
            # another replica after it was parked): its holder, if any, says.
            info = await self._call_back(session_id, owner)
        if info is None:
            info = await self._taken_over(session_id, owner)
        if info is None:
            known = self._forget(session_id, owner)
            if known is not None and time.monotonic() >= known[1]:
                self._store.note_ended(session_id, errors.SESSION_EXPIRED, owner)
                self._metrics.sessions_ended.labels(known[0].name, known[0].version, "expire").inc()
            return None
        return await self._take_back(
            session_id, owner, uuid.uuid4().hex, info, started, rehome=rehome
        )

    async def _take_back(
        self,
        session_id: str,
        owner: str,
        token: str,
        info: ParkedInfo,
        started: float,
        *,
        again: bool = False,
        rehome: Rehome | None = None,
    ) -> Session:
        """Take the session ``info`` describes with ``token`` and restore it into a slot (of
        the version ``rehome`` names if its own is not loaded here)."""
        assert self._state is not None
        key = (owner, session_id)
        identity = owner
        if info.owner != identity:
            # Another identity's session is invisible, parked or not.
            raise RnnserveError(
                grpc.StatusCode.NOT_FOUND,
                errors.SESSION_NOT_FOUND,
                f"session {session_id!r} does not exist",
            )
        if info.format not in READS:
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.VERSION_NOT_FOUND,
                f"session {session_id!r} is parked in record format {info.format}, which this "
                f"server does not read (it reads {sorted(READS)}); it is left in the store",
            )
        # Looked up now, not at start: versions are loaded and retired while serving.
        name, _, version = info.model.rpartition(":")
        model = self._repository.models.get(name, {}).get(version)
        if model is None:
            if rehome is None:
                raise self._not_loaded(session_id, info.model)
            model = rehome(info.model)  # raises when it may not go there: nothing taken
        slot = await self._room(model, owner)
        try:
            data = await self._take(session_id, owner, token, info, again)
        except StoreUnavailable as exc:
            self._store.release(model, slot)
            raise _unavailable(session_id, exc) from None
        if data is None:  # taken by another server (or expired) meanwhile: ask again shortly
            self._store.release(model, slot)
            self._forget(session_id, owner)
            raise _moving(session_id)
        try:
            record = self._decode(session_id, identity, data, rehome)
            target = self._persistence.model_of(record)
            if target is not None and target is not model:
                # Not the record peeked: the session moved to another version and was parked
                # again since (a take asked again keeps what it peeked first). Its slot must
                # be one of its own version's slabs.
                self._store.release(model, slot)
                slot = -1  # none held while room is made in the record's version
                model = target
                slot = await self._room(model, owner)
            session = self._restore(record, slot)
        except BaseException as exc:
            if slot >= 0:
                self._store.release(model, slot)
            if isinstance(exc, RnnserveError) and exc.code == grpc.StatusCode.DATA_LOSS:
                await self._finish_take(session_id, owner, token, dropped=True)
            else:
                # Not ours to drop: back into the store for a server that can take it.
                self._taking[key] = (token, info)
                self._background(self._give_back_alone(key))
            raise
        # Served only once the take is confirmed: a take not confirmed within its lease
        # may be taken over by another replica, and the session must not live on both.
        # Meanwhile it waits detached in its slot (no call, step or park can reach it).
        self._store.detach(session)
        try:
            confirmed = await self._state.confirm_take(session_id, owner, token)
        except BaseException as exc:
            self._store.parked(session)  # its state is still in the store, the take open
            self._taking[key] = (token, info)
            if isinstance(exc, StoreUnavailable):
                raise _unavailable(session_id, exc) from None
            raise
        if not confirmed:  # taken over after its lease: it is another replica's now
            self._store.parked(session)
            self._forget(session_id, owner)
            raise _moving(session_id)
        self._store.reattach(session, recent=True)
        self._forget(session_id, owner)
        # The take named this replica the holder; the record it moved aside goes now.
        self._background(self._finish_take(session_id, owner, token))
        with self._store.held(session):
            await self._mark_if_draining(session)
        labels = (model.name, model.version)
        self._metrics.unparks.labels(*labels).inc()
        self._metrics.unpark_latency.labels(*labels).observe(time.perf_counter() - started)
        logger.debug("event=unpark session=%s model=%s", session.id, model.key)
        return session

    async def _room(self, model: ModelVersion, owner: str) -> int:
        """A slot of ``model`` reserved for a session taken back: parking another if needed,
        else the ``on_full`` policy (which may raise)."""
        slot = await self.reserve_slot(model)
        return self._store.make_room(model, owner) if slot is None else slot

    async def _take(
        self, session_id: str, owner: str, token: str, info: ParkedInfo, again: bool
    ) -> bytes | None:
        """The store's take, asked once more with its token if its reply may be lost; while
        nobody can tell whether it ran, the take stays open (``_taking``)."""
        assert self._state is not None
        key = (owner, session_id)
        try:
            data = await self._state.take(session_id, owner, token, self.replica_id, again=again)
        except StoreUnavailable as exc:
            if exc.unsent:
                raise  # never ran (an open take of it stays open)
            self._taking[key] = (token, info)
            data = await self._state.take(session_id, owner, token, self.replica_id, again=True)
        self._taking.pop(key, None)
        return data

    async def _give_back(self, key: Key) -> bool:
        """Return to the store what an open take of ``key`` took, if it ran, so that any
        replica can take it; False (still open) if the store did not answer. The caller
        holds the session's move (``_alone``/``_claim``)."""
        assert self._state is not None
        pending = self._taking.get(key)
        if pending is None:
            return True
        owner, session_id = key
        try:
            await self._state.give_back(session_id, owner, pending[0])
        except StoreUnavailable:
            return False
        if self._taking.get(key) == pending:
            del self._taking[key]
        return True

    async def _give_back_alone(self, key: Key) -> None:
        await self._alone(key, lambda: self._give_back(key))

    async def _finish_take(
        self, session_id: str, owner: str, token: str, *, dropped: bool = False
    ) -> None:
        """Drop the record a take moved aside (again at the next reaper round if the store
        does not answer; it expires anyway); ``dropped``: the session was refused (corrupt),
        and this replica's holder record of it goes too."""
        assert self._state is not None
        unfinished = (owner, session_id, token, dropped)
        try:
            await self._state.finish_take(
                session_id, owner, token, self.replica_id if dropped else None
            )
        except StoreUnavailable:
            self._unfinished.add(unfinished)
            return
        self._unfinished.discard(unfinished)

    async def _taken_over(self, session_id: str, owner: str) -> ParkedInfo | None:
        """The session, parked again for this replica to take, if another replica's take of
        it was not confirmed within its lease (that replica died, drained or was cut off from
        the store before it could serve it; giving the take back voids its token, so it never
        will). None when nothing of the session is in the store. SESSION_MOVING while a take
        is on its way (confirmed, or within its lease), or if it was parked after all."""
        assert self._state is not None
        try:
            taken = await self._state.peek_taken(session_id, owner)
            if taken is None:
                if await self._state.exists(session_id, owner):
                    raise _moving(session_id)  # parked after all, meanwhile
                return None
            if taken.confirmed or not 0 <= TAKE_LEASE_S <= taken.held_s:
                raise _moving(session_id)  # taken by a replica that did not finish it yet
            if await self._state.give_back(session_id, owner, taken.token):
                logger.warning(
                    "event=take_taken_over session=%s held_s=%.1f: its taker did not confirm "
                    "it within its lease (gone, or cut off from the store); taken here",
                    session_id,
                    taken.held_s,
                )
            info = await self._state.peek(session_id, owner)
        except StoreUnavailable as exc:
            raise _unavailable(session_id, exc) from None
        if info is None:
            raise _moving(session_id)
        return info

    # -- lost replies: settling what they left open ------------------------------------------
    @contextlib.contextmanager
    def _claim(self, keys: Iterable[Key]) -> Iterator[list[Key]]:
        """Mark those of ``keys`` not moving already as moving for the block (calls for them
        wait); the block gets the keys it holds."""
        loop = asyncio.get_running_loop()
        claimed = [key for key in dict.fromkeys(keys) if key not in self._moving]
        for key in claimed:
            self._moving[key] = loop.create_future()
        try:
            yield claimed
        finally:
            for key in claimed:
                self._moving.pop(key).set_result(None)

    async def _alone(self, key: Key, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` as the one move of ``key`` here, after those in flight."""
        while True:
            while (moving := self._moving.get(key)) is not None:
                await moving
            with self._claim([key]) as claimed:
                if claimed:
                    return await work()

    async def _settle_parks(self, keys: Sequence[Key]) -> None:
        """Ask the store how the parks of ``keys`` whose reply was lost ended, and act on it.
        Raises StoreUnavailable (still in doubt) if it cannot say. The caller holds the
        sessions' moves."""
        assert self._state is not None
        parks = [self._doubt[key] for key in keys if key in self._doubt]
        if not parks:
            return
        written = await self._state.settle_parks(
            [park.entry for park in parks], [park.parker for park in parks]
        )
        for park in parks:
            del self._doubt[park.session.key]
        self._settled(parks, written)

    def _settled(self, parks: Sequence[_Park], outcomes: Sequence[int]) -> None:
        """Parks whose outcome is known: each session written has left (it is in the store,
        or was taken from it since), each other one is resident here again, unless another
        replica holds its id by now (opened there while this one could not be reached, and
        so told NOT_FOUND): then this copy ends, for the session not to live twice."""
        assert self._state is not None
        done = []
        for park, outcome in zip(parks, outcomes, strict=True):
            session = park.session
            if outcome == SUPERSEDED:
                logger.warning(
                    "event=session_superseded session=%s: its park was not written and another "
                    "replica holds its id now (opened there while this one could not reach the "
                    "store); this copy ends",
                    session.id,
                )
                self._store.reattach(session)
                self._store.evict(session)
            elif outcome == WRITTEN:
                labels = (session.model.name, session.model.version)
                self._store.parked(session)
                keeps = park.trigger in _KEEPING_TRIGGERS
                self._remember(session, park.at + park.entry.ttl_s, keeps)
                self._metrics.parks.labels(*labels, park.trigger).inc()
                done.append(park.entry)
            else:
                self._store.reattach(session)
                if park.restored:
                    self.hold(session)  # its holder record names the process that parked it
                self._store.expired(session)  # its idle time ran out while in doubt
        if done:
            self._background(self._state.drop_receipts(done))

    async def _settle_one(self, key: Key) -> bool:
        """Settle the park or take of ``key`` whose reply was lost, now; False if the store
        could not say (or the session is moving)."""
        with self._claim([key]) as claimed:
            if not claimed:
                return False
            try:
                await self._settle_parks(claimed)
            except StoreUnavailable:
                return False
            return await self._give_back(key)

    async def _settle(self, *, force: bool = False) -> None:
        """Settle what lost replies left open, if the store answers: parks (their sessions
        leave, or stay resident), takes (given back) and taken records (dropped). Skipped
        during the store's pause after an error, unless ``force``-d (a drain)."""
        assert self._state is not None
        if not self._state.available and not force:
            return
        with self._claim(list(self._doubt)) as keys:
            try:
                await self._settle_parks(keys)
            except StoreUnavailable:
                return
        for key in list(self._taking):
            with self._claim([key]) as claimed:
                if claimed and not await self._give_back(key):
                    return
        for unfinished in list(self._unfinished):
            owner, session_id, token, dropped = unfinished
            await self._finish_take(session_id, owner, token, dropped=dropped)
            if unfinished in self._unfinished:
                return

    # -- holders and releases ----------------------------------------------------------------
    def hold(self, session: Session) -> None:
        """Record this replica as the session's holder, in the background (best effort: with
        the store down the session is served here all the same; only a call back from
        elsewhere would miss it). Never awaited where it is called: an await between a
        session becoming resident and its caller using it would let another call park it."""
        if self._state is not None:
            self._background(self._hold_now(session))

    async def _hold_now(self, session: Session) -> None:
        """Record this replica as the holder of a session opened (or forked) under an id the
        server made, before the open is answered: another replica asked for it right after
        (its client's next call landing there) must find it held here, or it answers
        NOT_FOUND for a live session. One round trip per open with a state store; with the
        store down the session is served here all the same and the record written once the
        store answers (:meth:`_rewrite_holders`). A client-chosen id is claimed instead
        (:meth:`_claim_id`), before it is opened."""
        assert self._state is not None
        try:
            await self._state.set_holder(session.id, session.owner, self.replica_id, _HOLDER_TTL_S)
        except StoreUnavailable:
            self._unheld.add(session.key)  # written again once the store answers (park_idle)
        else:
            self._unheld.discard(session.key)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a store write that nobody waits for; a store outage only loses the write."""

        async def run() -> None:
            try:
                await work
            except StoreUnavailable:
                pass

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)

    def session_event(self, event: str, session: Session) -> None:
        """A session that ended here (closed, expired, evicted) drops its holder record, so
        the store does not keep one per session ever opened and no replica asks for it."""
        if self._state is None or event not in _ENDED_EVENTS:
            return
        self._background(self._state.drop_holder(session.id, session.owner, self.replica_id))
        if self._draining:  # marked moving by the drain, ended instead of handed off
            self._background(self._state.unmark_moving(session.id, session.owner))

    async def _call_back(self, session_id: str, owner: str) -> ParkedInfo | None:
        """Ask the replica holding ``session_id`` to park it; what is parked, once it is, or
        None when no live replica holds it (it ended, or its replica is gone).

        A session that is alive but could not be had in time (its holder busy with it, the
        store failing, another replica taking it first) is UNAVAILABLE "retry", never
        NOT_FOUND: NOT_FOUND tells a client to start over."""
        assert self._state is not None
        try:
            holder = await self._state.holder(session_id, owner)
            if holder is None or holder == self.replica_id:
                return None
            if not await self._state.request_release(holder, session_id, owner):
                # Nobody listens on that replica's channel: it is gone, or it is draining
                # and parks its sessions now (the record may have landed, and its moving
                # mark gone, after this call's first look): one last look at both.
                info = await self._state.peek(session_id, owner)
                if info is None and await self._state.is_moving(session_id, owner):
                    raise _moving(session_id)
                return info
            deadline = time.monotonic() + _RELEASE_WAIT_S
            while time.monotonic() < deadline:
                await asyncio.sleep(_RELEASE_POLL_S)
                info = await self._state.peek(session_id, owner)
                if info is not None:
                    self._metrics.call_backs.labels("released").inc()
                    return info
                now_held = await self._state.holder(session_id, owner)
                if now_held is None:
                    # The holder no longer had it (its record dropped): one last look.
                    info = await self._state.peek(session_id, owner)
                    if info is not None:
                        self._metrics.call_backs.labels("released").inc()
                    return info
                if now_held != holder:
                    raise _moving(session_id)  # taken by a third replica meanwhile
        except StoreUnavailable as exc:
            raise _unavailable(session_id, exc) from None
        self._metrics.call_backs.labels("timeout").inc()
        raise _moving(session_id)

    async def _listen(self) -> None:
        """Serve release requests from other replicas for as long as this server runs."""
        assert self._state is not None
        while True:
            try:
                async for owner, session_id in self._state.releases(
                    self.replica_id, self._listener_tried.set
                ):
                    task = asyncio.get_running_loop().create_task(self._release(session_id, owner))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    task.add_done_callback(_retrieve)
            except StoreUnavailable as exc:
                logger.warning("event=release_channel_lost error=%s; resubscribing", exc)
                if not self._listener_tried.is_set():
                    self._listener_failed = True
                    self._listener_tried.set()
            await asyncio.sleep(1.0)

    async def _release(self, session_id: str, owner: str) -> None:
        """Park a session another replica asked for, once its running steps are done; if it
        is not here, say so by dropping this replica's holder record."""
        assert self._state is not None
        deadline = time.monotonic() + _RELEASE_WAIT_S
        key = (owner, session_id)
        while True:
            session = self._store.resident(session_id, owner)
            if session is None and (key in self._doubt or key in self._taking):
                # A move of it whose reply was lost: settled now (it is parked after that,
                # or resident again and parked below), or the asker waits and retries.
                if await self._shielded(self._settle_one(key)):
                    continue
                return
            if session is None:
                if (owner, session_id) not in self._moving:
                    try:
                        await self._state.drop_holder(session_id, owner, self.replica_id)
                    except StoreUnavailable:
                        pass
                return
            if session.busy == 0:
                if await self._shielded(self._park([session], "release")):
                    # Released to the replica that asked, not parked to come back here:
                    # nothing to remember (or to note expired later).
                    self._forget(session_id, owner)
                return
            if time.monotonic() >= deadline:
                logger.warning("event=release_timeout session=%s", session_id)
                return
            await asyncio.sleep(_RELEASE_POLL_S)

    async def _claim_id(self, session_id: str, owner: str) -> str:
        """Claim the caller's session id for this replica (:meth:`StateStore.claim`: one
        atomic step, one round trip); the claim's token. ALREADY_EXISTS if it is parked,
        moving, or held by another running replica. UNAVAILABLE (``STATE_STORE_UNAVAILABLE``)
        if the store cannot say; a claim that may have run, its reply lost, is taken back
        first, so the answer still means that nothing was done. This replica's earlier
        claims of the id not taken back yet go with this one, whatever it finds."""
        assert self._state is not None
        key = (owner, session_id)
        token = uuid.uuid4().hex
        earlier = tuple(self._unclaimed.get(key, ()))
        try:
            claimed = await self._state.claim(
                session_id, owner, self.replica_id, _HOLDER_TTL_S, token, earlier
            )
        except StoreUnavailable as exc:
            if not exc.unsent:
                await self._unclaim(session_id, owner, token, follow_up=True)
            raise RnnserveError(
                grpc.StatusCode.UNAVAILABLE,
                STORE_UNAVAILABLE,
                f"cannot check that session id {session_id!r} is free: {exc}",
                retry_after_s=_RETRY_AFTER_S,
            ) from None
        except BaseException:
            # Stopped while the claim was on its way (the call cancelled): it may land.
            self._unclaimed.setdefault(key, set()).add(token)
            raise
        self._taken_back(key, earlier)  # by this claim, in the same step
        if not claimed:
            raise _exists(session_id)
        return token

    async def _unclaim(
        self, session_id: str, owner: str, token: str, *, follow_up: bool = False
    ) -> None:
        """Take back this replica's claim ``token`` of an id it did not open, so that the id
        is not held by a replica without its session (another replica's open of it would be
        refused, a call for it answered NOT_FOUND only after a call back), and so that the
        claim, were it still on its way, claims nothing when it lands. ``follow_up``: the
        claim's reply was lost, and this is asked even during the store's pause after that.
        If the store does not answer (or the call is cancelled meanwhile), reaper rounds ask
        again (:meth:`_take_back_claims`), as does this replica's next claim of the id."""
        assert self._state is not None
        key = (owner, session_id)
        # Until the store has taken it back, however this ends.
        self._unclaimed.setdefault(key, set()).add(token)
        try:
            await self._state.unclaim(
                session_id, owner, self.replica_id, [token], follow_up=follow_up
            )
        except StoreUnavailable:
            return
        self._taken_back(key, [token])

    def _taken_back(self, key: Key, tokens: Iterable[str]) -> None:
        """Forget claims of ``key`` the store has taken back."""
        left = self._unclaimed.get(key)
        if left is None:
            return
        left.difference_update(tokens)
        if not left:
            del self._unclaimed[key]

    async def _marked_moving(self, session_id: str, owner: str) -> bool:
        assert self._state is not None
        try:
            return await self._state.is_moving(session_id, owner)
        except StoreUnavailable:
            return False

    def _decode(
        self, session_id: str, owner: str, data: bytes, rehome: Rehome | None = None
    ) -> SessionRecord:
        """Decode and check a taken session's record (the caller gives it back to the store if
        it cannot be opened here, and drops it if it is corrupt: DATA_LOSS). A record of a
        version not loaded here comes back relabelled onto the version ``rehome`` names, if
        given, once its state is checked against that version.

        The record inside must name the very id and owner it was taken under: a store entry
        whose data names another session or identity (a forged or mixed-up entry) would
        otherwise bring that other session back to this caller. Such an entry is refused and
        dropped, never restored.
        """
        assert self._state is not None
        try:
            (record,) = decode_sessions(data, f"{self._state.name} session {session_id}").sessions
            if record.session_id != session_id or record.owner != owner:
                raise ValueError(
                    f"its data names session {record.session_id[:64]!r} of another identity "
                    "or id than the key it was stored under"
                    if record.owner != owner
                    else f"its data names session {record.session_id[:64]!r}"
                )
            forged = self._persistence.forged(record)
            if forged is not None:
                self._metrics.records_refused.labels("state_store", "signature").inc()
                raise ValueError(forged)
        except (SnapshotError, ValueError) as exc:
            logger.error("event=unpark_corrupt session=%s error=%s", session_id, exc)
            raise RnnserveError(
                grpc.StatusCode.DATA_LOSS,
                errors.INTERNAL,
                f"session {session_id!r}: its parked state is corrupt",
            ) from None
        onto = None
        if rehome is not None and self._persistence.model_of(record) is None:
            # Looked up for the record taken, not the one peeked: it may have moved since.
            onto = rehome(f"{record.model}:{record.version}")
        reason = self._persistence.check(record, onto)
        if reason is not None:
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.VERSION_NOT_FOUND,
                f"session {session_id!r} cannot be restored here: {reason}",
            )
        if onto is not None:
            record = dataclasses.replace(record, model=onto.name, version=onto.version)
        return record

    def _not_loaded(self, session_id: str, model: str) -> RnnserveError:
        """A session parked on a version this server does not load: retired and released
        here (its state waits in the store; an operator may move it), or never loaded."""
        if model in self._repository.released:
            name = model.rpartition(":")[0]
            why = (
                "which was retired and released on this server; it is never carried onto "
                f"another version unasked: an operator can move it to another version of "
                f"{name!r} (AdminService MoveSession), else open a new session"
            )
        else:
            why = "which this server does not load"
        return RnnserveError(
            grpc.StatusCode.FAILED_PRECONDITION,
            errors.VERSION_NOT_FOUND,
            f"session {session_id!r} is parked for model {model}, {why}",
            metadata={"session_id": session_id, "model": model},
        )

    def _restore(self, record: SessionRecord, slot: int) -> Session:
        """Open a decoded record (:meth:`_decode`) in ``slot``, reserved in its version."""
        session = self._persistence.restore_one(record, slot=slot, event="unpark")
        # Its idle clock goes on from its last use (a GetSession does not reset it, as it
        # does not for a resident session); a step resets it when it commits.
        if record.last_use_time:
            idle = max(0.0, time.time() - record.last_use_time)
            session.last_use = time.monotonic() - idle
        return session

    def _remember(self, session: Session, until: float, keeps: bool) -> None:
        """Note a session parked here (until its key expires in the store at ``until``)."""
        self._forget(session.id, session.owner)  # known from an earlier park (rare)
        self._metrics.parked_sessions.labels(session.model.name, session.model.version).inc()
        self._parked[session.key] = (session.model, until)
        if keeps:
            self._kept.add(session.key)
            self._keeping[id(session.model)] = self._keeping.get(id(session.model), 0) + 1

    def _forget(self, session_id: str, owner: str) -> tuple[ModelVersion, float] | None:
        """Drop a session parked here from what this replica knows of (taken back, taken
        elsewhere, released to another replica, expired); what it knew of it, if anything."""
        key = (owner, session_id)
        known = self._parked.pop(key, None)
        if known is None:
            return None
        model = known[0]
        self._metrics.parked_sessions.labels(model.name, model.version).dec()
        if key in self._kept:
            self._kept.discard(key)
            left = self._keeping.pop(id(model)) - 1
            if left:
                self._keeping[id(model)] = left
            if self._on_left is not None:
                self._on_left(model)
        return known

    def keeping(self, model: ModelVersion) -> int:
        """How many sessions of ``model`` this replica parked to come back here (idle, or to
        make room) and still knows of: a retiring version waits for them as for resident
        ones, so a client coming back to one finds its version still loaded."""
        return self._keeping.get(id(model), 0)

    # -- opening sessions --------------------------------------------------------------------
    async def open(
        self,
        model: ModelVersion,
        session_id: str,
        owner: str,
        opener: Callable[[int | None], Session],
    ) -> Session:
        """Run ``opener`` with a slot of ``model`` made free by parking, if one was needed.

        A client-chosen id must be free in the store too, and is claimed there first
        (:meth:`_open_claimed`): ALREADY_EXISTS if the caller's session of that id is parked,
        moving or held by another running replica (another identity's never counts), or if
        another replica claims it first. An id the server makes (a UUID) needs no claim: its
        holder record is written once it is open. ``opener`` gets None when no slot was
        reserved: the store's own path (free slot, or the ``on_full`` policy) applies.
        """
        if self._state is None:
            return opener(None)
        if session_id:
            check_session_id(session_id, "session_id")  # before any store key is built of it
            key = (owner, session_id)
            return await self._alone(
                key, lambda: self._open_claimed(model, session_id, owner, opener)
            )
        session = await self._open_in_slot(model, opener)
        with self._store.held(session):  # not parked while its holder record is written
            await self._hold_now(session)
            await self._mark_if_draining(session)
        return session

    async def _open_claimed(
        self,
        model: ModelVersion,
        session_id: str,
        owner: str,
        opener: Callable[[int | None], Session],
    ) -> Session:
        """Open a client-chosen id once this replica has claimed it in the store. The caller
        holds the id's move here (:meth:`_alone`): no other open, take or park of it runs
        on this replica meanwhile, and a release asked for it leaves its claim standing.

        Looking for the id in the store and writing the holder record after the open let
        two replicas opening one id at once both find it free and both open it: one id, two
        sessions. The claim looks and writes in one step, so one of them gets it and the
        other answers ALREADY_EXISTS having written nothing. It names this replica the
        holder before the session is open, in the same round trip, so another replica that
        gets the client's next call finds it held here; an open that fails after its claim
        takes the claim back."""
        key = (owner, session_id)
        # Not self._parked: what this replica parked may have been taken (and closed)
        # elsewhere since; the claim asks the store, whose truth that is.
        if self._store.is_resident(session_id, owner) or key in self._doubt or key in self._taking:
            raise _exists(session_id)
        token = await self._claim_id(session_id, owner)
        try:
            session = await self._open_in_slot(model, opener)
        except BaseException:
            await self._unclaim(session_id, owner, token)
            raise
        with self._store.held(session):  # not parked while this open holds its move
            await self._mark_if_draining(session)
        return session

    async def _open_in_slot(
        self, model: ModelVersion, opener: Callable[[int | None], Session]
    ) -> Session:
        """``opener`` run in a slot made free by parking (none if that was not needed or not
        possible), the slot given back if it fails. Nothing is awaited once the session is
        open: the caller holds it before anything can park it."""
        slot = await self.reserve_slot(model)
        try:
            return opener(slot)
        except BaseException:
            if slot is not None:
                self._store.release(model, slot)
            raise

    async def reserve_slot(self, model: ModelVersion) -> int | None:
        """A free slot of ``model``, parking its least recently used idle session if needed.

        When every resident session has a step queued or running, this waits (up to
        ``_ROOM_WAIT_S``) for one to finish rather than refusing: a crowd of returning
        sessions takes turns instead of failing. None when parking is off, the store is
        down, or no session became idle in time; the model's ``on_full`` policy follows.
        """
        if self._state is None:
            return None
        deadline = time.monotonic() + _ROOM_WAIT_S
        while True:
            slot = self._store.reserve(model)
            if slot is not None:
                return slot
            if time.monotonic() >= deadline:
                return None
            victim = self._store.least_recent_idle(model)
            if victim is not None:
                # Its slot goes back to the free list, taken on the next turn of this loop
                # (or by another call first: then the loop parks another).
                if not await self._shielded(self._park([victim], "full")):
                    return None
                continue
            await asyncio.sleep(_ROOM_POLL_S)

    # -- parking -----------------------------------------------------------------------------
    async def park_idle(self) -> int:
        """Park every session idle longer than ``park_after_s``; how many were parked. Holder
        records an outage kept from being written are written first (each reaper round)."""
        if self._state is None:
            return 0
        await self._rewrite_holders()
        await self._take_back_claims()
        await self._settle()
        if self._park_after_s is None:
            return 0
        return await self._park_many(self._store.idle(self._park_after_s), "idle")

    async def _rewrite_holders(self) -> None:
        """Write the holder records the store missed while it was down: without one another
        replica answers NOT_FOUND for a session resident here, and may open its id again."""
        assert self._state is not None
        if not self._unheld or not self._state.available:
            return
        for owner, session_id in list(self._unheld):
            session = self._store.resident(session_id, owner)
            if session is None or session.ended:
                self._unheld.discard((owner, session_id))
                continue
            try:
                await self._state.set_holder(session_id, owner, self.replica_id, _HOLDER_TTL_S)
            except StoreUnavailable:
                return  # still down: the next round tries again
            self._unheld.discard((owner, session_id))

    async def _take_back_claims(self) -> None:
        """Take back the claims of ids not opened here that the store could not take back
        when the open failed (:meth:`_unclaim`). If the id is here by now (taken from the
        store, or being taken, or a park of it in doubt) its holder record is this replica's
        rightly, whatever wrote it: the claims are only voided, so that none still on its way
        lands after the session has left."""
        assert self._state is not None
        if not self._unclaimed or not self._state.available:
            return
        for key, tokens in list(self._unclaimed.items()):
            owner, session_id = key
            with self._claim([key]) as alone:
                if not alone:
                    continue  # an open or move of it runs here: the next round tries again
                here = self._store.is_resident(session_id, owner)
                here = here or key in self._doubt or key in self._taking
                taken_back = tuple(tokens)
                try:
                    await self._state.unclaim(
                        session_id, owner, self.replica_id, taken_back, drop=not here
                    )
                except StoreUnavailable:
                    return  # still down: the next round tries again
                self._taken_back(key, taken_back)

    async def mark_all_moving(self) -> int:
        """Before a drain stops serving: mark every resident session as on its way to the
        store, so a replica that gets its next call early says "retry", not "not found"."""
        if self._state is None:
            return 0
        self._draining = True
        # Every resident session, busy ones too (a step in flight at the drain's start is
        # the usual case under load): each is handed off or ends before this server stops.
        ids = list(self._store.sessions)
        try:
            await self._state.mark_moving(ids, _MOVING_TTL_S)
        except StoreUnavailable:
            return 0  # the handoff will fail too; the snapshot, if any, keeps them
        return len(ids)

    async def _mark_if_draining(self, session: Session) -> None:
        """Mark a session that became resident after the drain marked the others."""
        if not self._draining:
            return
        assert self._state is not None
        try:
            await self._state.mark_moving([session.key], _MOVING_TTL_S)
        except StoreUnavailable:
            pass  # as mark_all_moving: the handoff will tell

    async def park_all(self) -> int:
        """Hand every resident session off to the store (drain); how many left for it.

        A store in its pause after an error (a lost reply, a moment's outage) is waited out,
        for up to ``handoff_wait_s`` in all, rather than taken for down: a drain is this
        replica's last chance to hand its sessions, and what lost replies left open, off.
        Parks and takes in doubt are asked again until the store answers (a park found not
        written leaves its session resident, to be parked again), within the same bound; a
        store that plainly refuses (down) ends the drain's handoff at once. What is still in
        doubt then goes into the snapshot, if the server keeps one (:meth:`_detached`)."""
        if self._state is None:
            return 0
        deadline = time.monotonic() + self._handoff_wait_s
        parked = 0
        while await self._store_back(deadline):
            doubt = set(self._doubt)
            open_before = len(self._doubt) + len(self._taking)
            if open_before:
                await self._settle(force=True)
            # Parks found written have left: handed off too.
            parked += sum(1 for k in doubt if k not in self._doubt and k in self._parked)
            written = await self._park_many(self._store.idle(-1.0), "drain", deadline)
            parked += written
            still_open = len(self._doubt) + len(self._taking)
            if not (still_open or self._store.idle(-1.0)):
                break
            if not written and still_open >= open_before:
                if not still_open or time.monotonic() >= deadline:
                    break  # the store refuses parks (down, or full): the snapshot keeps them
                await asyncio.sleep(_RELEASE_POLL_S)
        if self._tasks:  # the receipts and taken records this leaves behind are dropped
            await asyncio.wait(list(self._tasks), timeout=_STOP_WAIT_S)
        if self._doubt or self._taking:
            logger.error(
                "event=handoff_in_doubt parks=%d takes=%d: the store lost their replies and "
                "cannot say yet whether they were done; sessions whose park is in doubt are "
                "in the snapshot (if any) with their park's token, settled against the store "
                "when it is restored, else lost if their park was not written; a session "
                "whose take is open is in the store, never served here, and the next replica "
                "that gets a call for it takes it over once the take's lease (%.0f s) ends",
                len(self._doubt),
                len(self._taking),
                TAKE_LEASE_S,
            )
        return parked

    async def _park_many(
        self, sessions: Sequence[Session], trigger: str, deadline: float | None = None
    ) -> int:
        """Park ``sessions`` chunk by chunk; how many left. Stops at the first chunk not
        written, unless a ``deadline`` is given (a drain): then a chunk whose reply was lost
        (in doubt) does not stop the next ones, which wait out the store's pause until then."""
        parked = 0
        for start in range(0, len(sessions), _CHUNK):
            chunk = [
                s
                for s in sessions[start : start + _CHUNK]
                if self._store.resident(s.id, s.owner) is s and s.busy == 0
            ]
            if deadline is not None and not await self._store_back(deadline):
                break
            done = await self._park(chunk, trigger)
            parked += sum(
                self._store.resident(s.id, s.owner) is None and s.key not in self._doubt
                for s in chunk
            )
            if not done and (deadline is None or not any(s.key in self._doubt for s in chunk)):
                break
        return parked

    async def _store_back(self, deadline: float) -> bool:
        """Wait, until ``deadline`` at most, for the store's pause after an error to end;
        whether it did (its calls are made again)."""
        assert self._state is not None
        while not self._state.available:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(0.05, left))
        return True

    async def _park(self, sessions: list[Session], trigger: str) -> bool:
        """Write ``sessions`` to the store and free their slots; False (nothing moved) if
        the store is down."""
        assert self._state is not None
        # Checked again here, where detaching follows without a pause: since they were
        # chosen, another call may have parked, used or closed some of them.
        sessions = [s for s in sessions if self._store.resident(s.id, s.owner) is s and s.busy == 0]
        if not sessions:
            return True
        if not self._state.available:
            return False
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        parks = []
        now = time.monotonic()
        for session in sessions:
            record = self._persistence.record(session, self._store.export(session))
            entry = ParkedEntry(
                session.id,
                session.owner,
                session.model.key,
                encode_sessions([record], created_at=time.time()),
                _time_left(session, now),
                uuid.uuid4().hex,
            )
            parks.append(_Park(session, entry, trigger, now, self.replica_id))
            self._store.detach(session)
            self._moving[session.key] = loop.create_future()
        written: list[int] | None = None
        try:
            written = await self._write([park.entry for park in parks])
        finally:
            if written is None:  # nobody can tell yet (or cancelled at shutdown): they wait
                for park in parks:
                    self._doubt[park.session.key] = park
            for session in sessions:
                self._moving.pop(session.key).set_result(None)
        if written is None:
            logger.warning(
                "event=park_in_doubt trigger=%s sessions=%d: the store lost the reply and "
                "cannot say yet whether they were written; they wait until it can",
                trigger,
                len(parks),
            )
            return False
        self._settled(parks, written)
        if any(outcome != WRITTEN for outcome in written):
            return False
        self._metrics.park_latency.labels(trigger).observe(time.perf_counter() - started)
        logger.debug("event=park trigger=%s sessions=%d", trigger, len(sessions))
        return True

    async def _write(self, entries: list[ParkedEntry]) -> list[int] | None:
        """Write ``entries`` to the store: for each, what became of it (:data:`WRITTEN`...);
        None while nobody can tell (the store ran the write or not, and cannot be asked)."""
        assert self._state is not None
        try:
            return [WRITTEN if ok else NOT_WRITTEN for ok in await self._state.put(entries)]
        except StoreUnavailable as exc:
            if exc.unsent:
                return [NOT_WRITTEN] * len(entries)
        # It may have run with its reply lost: ask (which also makes it land nowhere later).
        try:
            return await self._state.settle_parks(entries, [self.replica_id] * len(entries))
        except StoreUnavailable:
            return None

    async def prune(self) -> None:
        """Forget parked sessions whose key has expired in the store. One whose holder record
        names another replica was taken there, not expired: it is forgotten uncounted. If the
        store cannot say, they wait for the next round.

        Sessions of a retiring version that keep it loaded are looked at every round, not
        only once their key expires: one taken up by another replica since (its holder record
        names that replica) no longer keeps the version here."""
        assert self._state is not None
        now = time.monotonic()
        retiring = self._repository.retiring
        due = [k for k, (_, until) in self._parked.items() if until <= now]
        watched: list[Key] = []
        for key in self._kept if retiring else ():
            model, until = self._parked[key]
            if until > now and model.key in retiring:
                watched.append(key)
        if not due and not watched:
            return
        try:
            holders = await self._state.holders(due + watched)
        except StoreUnavailable:
            return
        for key, holder in zip(watched, holders[len(due) :], strict=True):
            entry = self._parked.get(key)
            if entry is not None and holder is not None and holder != self.replica_id:
                self._forget(key[1], key[0])  # taken by that replica
        for (owner, session_id), holder in zip(due, holders[: len(due)], strict=True):
            entry = self._parked.get((owner, session_id))
            if entry is None or entry[1] > now:
                continue  # taken back, or parked again, while the store was asked
            known = self._forget(session_id, owner)
            if holder is not None and holder != self.replica_id:
                continue  # taken by that replica (a take moves the holder record there)
            self._store.note_ended(session_id, errors.SESSION_EXPIRED, owner)
            if known is not None:
                self._metrics.sessions_ended.labels(known[0].name, known[0].version, "expire").inc()


def _time_left(session: Session, now: float) -> float:
    """How long ``session`` may stay idle from ``now``: the key's TTL when it is parked (not
    a whole idle timeout counted from the park, which let parked sessions outlive it)."""
    timeout = session.model.config.limits.idle_timeout_s
    return max(_MIN_PARKED_TTL_S, timeout - (now - session.last_use))


#: A parked key lives at least this long: one written with no time left would be gone
#: before the replica that parked it answered its next call.
_MIN_PARKED_TTL_S = 1.0

#: The RetryInfo of "retry shortly" answers (a session moving, the store out): the client
#: retries after this rather than at once.
_RETRY_AFTER_S = 0.2


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shielded move's outcome as seen (its caller may have gone)."""
    if not task.cancelled():
        task.exception()


def _unavailable(session_id: str, exc: StoreUnavailable) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.UNAVAILABLE,
        STORE_UNAVAILABLE,
        f"session {session_id!r} is not resident on this server and cannot be brought "
        f"back: {exc}; its state is kept there, retry later",
        retry_after_s=_RETRY_AFTER_S,
    )


def _moving(session_id: str) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.UNAVAILABLE,
        SESSION_MOVING,
        f"session {session_id!r} is moving between replicas; retry shortly",
        retry_after_s=_RETRY_AFTER_S,
    )


def _exists(session_id: str) -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.ALREADY_EXISTS,
        errors.SESSION_EXISTS,
        f"session {session_id!r} already exists",
    )


class Residency(Protocol):
    """Where sessions live besides the slabs: the engine consults this once per call."""

    @property
    def enabled(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def session_event(self, event: str, session: Session) -> None: ...

    async def ensure_resident(
        self, session_id: str, owner: str, rehome: Rehome | None = None
    ) -> None: ...

    def keeping(self, model: ModelVersion) -> int: ...

    async def open(
        self,
        model: ModelVersion,
        session_id: str,
        owner: str,
        opener: Callable[[int | None], Session],
    ) -> Session: ...

    async def park_idle(self) -> int: ...

    async def prune(self) -> None: ...

    async def mark_all_moving(self) -> int: ...

    async def park_all(self) -> int: ...


class NoResidency:
    """Without a state store every session lives in its slab: nothing to park or bring back."""

    enabled = False

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def session_event(self, event: str, session: Session) -> None:
        return None

    async def ensure_resident(
        self, session_id: str, owner: str, rehome: Rehome | None = None
    ) -> None:
        return None

    def keeping(self, model: ModelVersion) -> int:
        return 0

    async def open(
        self,
        model: ModelVersion,
        session_id: str,
        owner: str,
        opener: Callable[[int | None], Session],
    ) -> Session:
        return opener(None)

    async def park_idle(self) -> int:
        return 0

    async def prune(self) -> None:
        return None

    async def mark_all_moving(self) -> int:
        return 0

    async def park_all(self) -> int:
        return 0
