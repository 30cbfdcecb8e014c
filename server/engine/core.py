"""The engine: the one owner of every session and all state, for one device.

Frontends hand it requests as arrays (never protobuf) and the caller's identity; it answers
with arrays, plain records and :class:`~rnnserve.server.errors.RnnserveError`. Steps come in
bulk (:meth:`Engine.submit`): each is checked against its session's model, queued on that
model's :class:`~.batcher.Batcher`, and answered through the caller's sink once its batch
ran. Residency (parking in a state store, or nothing) is consulted once per call; snapshots,
handoff and the idle reaper run here too. In one process the frontend calls these methods
directly; with several frontend processes :mod:`.ipc` carries the same calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from .. import errors
from ..busy_poll import BusyPoll
from ..errors import RnnserveError
from ..metrics import Depth, InfoLabels, Metrics
from ..repository import ModelVersion, Repository
from .batcher import _KEY, Batcher, Outcome, Queued, Sink, failed_in_turn
from .lifecycle import LEAVING_EVENTS, Lifecycle, VersionStatus, state_difference
from .persistence import PARK_TOKEN, OwnerCheck, Persistence
from .residency import NoResidency, Parking, Residency
from .signing import RecordSigner
from .snapshot import SessionRecord, Snapshotter, keep_copy, load_snapshot
from .state_store import StateStore
from .store import Session, SessionInfo, SessionStore, check_session_id

logger = logging.getLogger(__name__)

#: How long closing a finished stream's sessions keeps asking for one that is not to be had
#: yet (moving between replicas, the state store out) before it gives up (and logs it).
RELEASE_RETRY_S = 10.0
_RELEASE_RETRY_PAUSE_S = 0.2

#: One step as a frontend hands it over: (ticket, session id, inputs by name, digest of the
#: inputs or None, expected_position or None). The ticket is the frontend's own id for it.
#: Inputs that could not even be decoded come as their error, answered in the session's turn.
StepIn = tuple[int, str, dict[str, np.ndarray] | RnnserveError, bytes | None, int | None]


@dataclass
class EngineConfig:
    """What the engine needs besides the loaded models."""

    max_sessions_per_identity: int = 0
    reap_interval_s: float = 1.0
    park_after_s: float | None = None
    snapshot_path: Path | None = None
    snapshot_interval_s: float | None = None
    slabs: str = "auto"  # state memory: auto | host | device (store.state_memory)
    #: HMAC key that signs snapshot records and parked sessions (None: unsigned).
    snapshot_key: bytes | None = None
    #: Whether an identity can call this server; a saved session of any other is refused.
    knows_owner: OwnerCheck | None = None
    #: Every identity that can own a session here, when they are known in advance (bearer
    #: tokens: those listed; no authentication: ``anonymous``), else None (mutual TLS: any
    #: certificate subject). A MoveSession that names no owner finds a session that is not
    #: resident here (parked, or held by another replica) by its id alone only when exactly
    #: one identity can own it: the state store keys sessions by owner and id.
    owners: frozenset[str] | None = None
    poll_repository_s: float | None = None  # load new version folders this often
    #: The frontends' receive limit, resolved once at start (0: not known here).
    message_limit_bytes: int = 0
    #: Why the frontends could not serve a version loaded while running (its largest valid
    #: request is above their receive limit), or None: such a load ends FAILED with it.
    version_check: Callable[[ModelVersion], str | None] | None = None
    #: How long the engine's loop keeps polling after a step (busy_poll.py); 0: never.
    busy_poll_s: float = 0.0
    #: How long a drain waits for a state store in its pause after an error (a lost reply,
    #: a moment's outage) before it gives up handing sessions off to it.
    handoff_wait_s: float = 5.0


class Engine:
    """Sessions, batching and residency of every loaded model version."""

    def __init__(
        self,
        repository: Repository,
        metrics: Metrics,
        config: EngineConfig | None = None,
        state_store: StateStore | None = None,
        on_event: Callable[[str, Session], None] | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self._busy_poll = BusyPoll(self.config.busy_poll_s)
        self.repository = repository
        self.metrics = metrics
        self._on_event = on_event
        self.store = SessionStore(
            repository.all(),
            self._session_event,
            self.config.max_sessions_per_identity,
            self.config.slabs,
        )
        signer = (
            None if self.config.snapshot_key is None else RecordSigner(self.config.snapshot_key)
        )
        self.persistence = Persistence(repository, self.store, signer, self.config.knows_owner)
        self.state_store = state_store
        self.residency: Residency = (
            NoResidency()
            if state_store is None
            else Parking(
                self.store,
                self.persistence,
                repository,
                state_store,
                metrics,
                self.config.park_after_s,
                self.config.handoff_wait_s,
                self._parked_left,
            )
        )
        self._parks = state_store is not None
        self.batchers = {mv.key: Batcher(mv, self.store, metrics) for mv in repository.all()}
        self._batcher_list = list(self.batchers.values())
        # Each session's batcher by its ModelVersion object (id checked against the batcher's
        # own model): one dict lookup per step instead of formatting the model's key.
        self._batcher_of: dict[int, Batcher] = {}
        # Steps of sessions being brought back from the state store, in arrival order.
        # Keyed (owner, id): session ids are namespaced by owner.
        self._arriving: dict[tuple[str, str], list[tuple[StepIn, Sink, float]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()  # release_later's closes
        self._reaper: asyncio.Task[None] | None = None
        self._snapshotter: Snapshotter | None = None
        #: While the snapshot is restored at start: how many restored sessions ended again
        #: (evicted to make room for later records), so the file is kept when any were lost.
        self._restoring = False
        self._restore_ended = 0
        self._periodic: asyncio.Task[None] | None = None
        self.lifecycle = Lifecycle(self)
        self._poller: asyncio.Task[None] | None = None
        self._catalogue = repository.catalogue()
        self._catalogue_listeners: list[Callable[[Repository], None]] = []
        self._predicting: dict[int, int] = {}  # Predict calls running, by id() of the version
        metrics.engine_gauges.watch(self._model_info, self._queue_depths)

    def _parked_left(self, model: ModelVersion) -> None:
        """A session parked here from ``model`` came back, went elsewhere or expired."""
        self.lifecycle.session_left(model)

    def _session_event(self, event: str, session: Session) -> None:
        if self._on_event is not None:
            self._on_event(event, session)
        if event in LEAVING_EVENTS:
            self.lifecycle.session_left(session.model)
            if self._restoring:  # a restored session ended by another's restore: not kept
                self._restore_ended += 1
        self.residency.session_event(event, session)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Restore the snapshot (if any), start the batchers and the reaper."""
        config = self.config
        if config.snapshot_path is not None:
            result = load_snapshot(config.snapshot_path, self._restorable)
            self._restoring, self._restore_ended = True, 0
            in_doubt = [r for r in result.accepted if PARK_TOKEN in r.extra]
            if isinstance(self.residency, Parking) and self.residency.enabled:
                # Each claims its id in the store first: held here, or left to the store's
                # newer copy. Those saved while their park was in doubt are settled first.
                plain = tuple(r for r in result.accepted if PARK_TOKEN not in r.extra)
                restored = await self.residency.restore_claimed(plain)
                if in_doubt:
                    restored += await self.residency.restore_in_doubt(in_doubt)
            else:
                if in_doubt:
                    logger.warning(
                        "event=restore_parks_in_doubt sessions=%d: saved while their park was "
                        "in doubt and no state store is configured to settle them; restored, "
                        "though a copy may also be in that store",
                        len(in_doubt),
                    )
                restored = self.persistence.restore(result.accepted)
            self._restoring = False
            lost = len(result.accepted) - restored + self._restore_ended
            if lost:
                # Checked records the store refused, or restored and then evicted by later ones
                # (a capacity or quota lowered since, a duplicate id): the next snapshot leaves
                # them out, so keep the file whole.
                keep_copy(config.snapshot_path, lost)
            logger.info(
                "event=restore path=%s restored=%d skipped=%d error=%r",
                config.snapshot_path,
                restored,
                len(result.rejected),
                result.error,
            )
            self._snapshotter = Snapshotter(
                config.snapshot_path, self.persistence.collect, config.snapshot_interval_s
            )
            self._periodic = asyncio.get_running_loop().create_task(
                self._snapshotter.run_periodically()
            )
        for batcher in self._batcher_list:
            batcher.start()
        await self.residency.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        if config.poll_repository_s:
            self._poller = asyncio.get_running_loop().create_task(
                self.lifecycle.poll_forever(config.poll_repository_s)
            )

    def _restorable(self, record: SessionRecord) -> str | None:
        """Why a snapshot's record is not restored (forged, unknown owner, another model),
        or None; refusals of the first two kinds are counted."""
        for reason, why in (
            ("signature", self.persistence.forged(record)),
            ("owner", self.persistence.unknown_owner(record)),
        ):
            if why is not None:
                self.metrics.records_refused.labels("snapshot", reason).inc()
                return why
        return self.persistence.check(record)

    async def begin_drain(self) -> int:
        """Before frontends stop taking calls: mark sessions as moving to the state store."""
        return await self.residency.mark_all_moving()

    async def stop(self) -> None:
        """Answer queued steps, stop the reaper, hand sessions off, write the snapshot."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.lifecycle.close()
        for batcher in self._batcher_list:
            await batcher.stop()
        for task in (self._reaper, self._periodic):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.residency.stop()  # no more releases, no move in flight
        if self._tasks:  # steps waiting for a session that was on its way back
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self.state_store is not None:
            handed = await self.residency.park_all()
            logger.info(
                "event=handoff store=%s sessions=%d left=%d",
                self.state_store.name,
                handed,
                len(self.store),
            )
        if self._snapshotter is not None:
            try:
                written = await self._snapshotter.write_now()
            except (OSError, ValueError):  # the stop goes on: frontends still close cleanly
                logger.exception(
                    "event=snapshot_failed path=%s sessions=%d (they are not saved)",
                    self.config.snapshot_path,
                    len(self.store),
                )
            else:
                logger.info(
                    "event=snapshot path=%s sessions=%d", self.config.snapshot_path, written
                )

    async def _reap(self) -> None:
        """Expire idle sessions periodically (lookups also expire them lazily), park idle ones."""
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            self.store.expire_idle()
            try:
                await self.residency.prune()
            except Exception:  # the reaper must outlive one bad round
                logger.exception("event=prune_failed")
            try:
                await self.residency.park_idle()
            except Exception:  # the reaper must outlive one bad round
                logger.exception("event=park_idle_failed")

    # -- models ------------------------------------------------------------------------------
    def catalogue(self) -> Repository:
        """The loaded versions without their onnxruntime sessions (what frontends describe)."""
        return self._catalogue

    def _model_info(self) -> list[InfoLabels]:
        """``model_info``'s labels of every loaded version (read at a scrape, on the metrics
        server's thread: the catalogue is replaced whole, never changed)."""
        return [
            (mv.name, mv.version, mv.device, mv.providers[0], mv.recurrent_provider)
            for mv in self._catalogue.all()
        ]

    def _queue_depths(self) -> list[Depth]:
        """Each batcher's queue depth now (read at a scrape, as :meth:`_model_info`)."""
        return [(b.model.name, b.model.version, b.depth) for b in self._batcher_list]

    def on_catalogue(self, listener: Callable[[Repository], None]) -> None:
        """Call ``listener`` with the new catalogue whenever versions come, go or retire."""
        self._catalogue_listeners.append(listener)

    def catalogue_changed(self) -> None:
        self._catalogue = self.repository.catalogue()
        for listener in self._catalogue_listeners:
            try:
                listener(self._catalogue)
            except Exception:  # one listener must not keep the others from hearing
                logger.exception("event=catalogue_listener_failed")

    def add_version(self, mv: ModelVersion, digest: str) -> None:
        """Start serving a loaded, checked and warmed-up version: slabs, batcher, catalogue.
        ``digest`` is its model file's (:func:`.snapshot.file_digest`): records of its
        sessions (snapshots, parking) carry it, as those of versions loaded at start do."""
        self.store.add_model(mv)
        self.repository.released.pop(mv.key, None)
        self.persistence._digests[mv.key] = digest  # noqa: SLF001
        batcher = Batcher(mv, self.store, self.metrics)
        batcher.start()
        self.batchers[mv.key] = batcher
        self._batcher_list = [*self._batcher_list, batcher]
        self._batcher_of.clear()
        self.repository.models.setdefault(mv.name, {})[mv.version] = mv
        self.repository.retiring.discard(mv.key)
        self.catalogue_changed()

    def remove_version(self, mv: ModelVersion) -> Batcher | None:
        """Stop serving a version with no session left: out of the catalogue, the lookup and
        the store (its slabs freed) at once. Its batcher is returned for :meth:`free_version`.
        """
        by_version = self.repository.models.get(mv.name, {})
        if by_version.get(mv.version) is not mv:
            return None  # removed already, or replaced by a new load of the same version
        del by_version[mv.version]
        if not by_version:
            del self.repository.models[mv.name]
        self.repository.retiring.discard(mv.key)
        self.repository.released[mv.key] = mv  # what sessions parked on it were (moves)
        batcher = self.batchers.pop(mv.key, None)
        self._batcher_list = [b for b in self._batcher_list if b is not batcher]
        self._batcher_of.clear()  # holds no retired batcher (nor, through it, its slabs)
        self.store.remove_model(mv)
        self.catalogue_changed()
        return batcher

    async def free_version(self, mv: ModelVersion, batcher: Batcher | None) -> None:
        """After :meth:`remove_version`: stop its batcher, close its onnxruntime session."""
        if batcher is not None:
            await batcher.stop()
        if mv.runner is not None:
            mv.runner.close()
            mv.runner = None

    async def load_model(self, model: str, version: str) -> list[VersionStatus]:
        return await self.lifecycle.load(model, version)

    async def retire_model(self, model: str, version: str, by: str) -> VersionStatus:
        return self.lifecycle.retire(model, version, by)

    async def repository_index(self) -> list[VersionStatus]:
        return self.lifecycle.index()

    async def move_session(self, session_id: str, owner: str, version: str) -> SessionInfo:
        """Carry a session (whoever owns it; ``owner`` may be empty when only one identity
        has this id) to ``version`` of its model when both declare exactly the same state
        pairs; its id, owner and position stay.

        A session not resident here (parked in the state store, or held by another replica)
        is brought back first, as a step would bring it, then moved: so an operator can empty
        a retiring version of every session, parked ones too. One parked on a version that
        was retired and released here is restored straight onto ``version``, after the
        same check of its state pairs against those the released version had.
        """
        if not version:
            raise errors.invalid_request("MoveSession needs a target version", "version")
        moved_from: list[str] = []
        session = await self._to_move(session_id, owner, version, moved_from)
        target = self.repository.for_new_work(session.model.name, version)
        if target is session.model:
            if moved_from:  # restored onto it from a released version's parked record
                self._log_move(session, moved_from[0])
            return session.info()
        difference = state_difference(session.model, target)
        if difference:
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.STATE_INCOMPATIBLE,
                f"cannot move session {session_id!r} from {session.model.key} to "
                f"{target.key}: {difference}",
            )
        if (
            session.busy
            or session.key in self._arriving
            or any(b.has_steps_of(session.key) for b in self._batcher_list)
        ):
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.SESSION_BUSY,
                f"session {session_id!r} has a step in flight; retry once it is answered",
                metadata={"session_id": session_id},
            )
        source = session.model.key
        self.store.move(session, target)
        self._log_move(session, source)
        return session.info()

    async def _to_move(
        self, session_id: str, owner: str, version: str, moved_from: list[str]
    ) -> Session:
        """The session a MoveSession names, resident here: brought back from the state store
        (or called back from another replica) if need be, as for any call that names it.
        ``moved_from`` gets the released version it was parked on, if it was restored
        straight onto ``version`` (nothing else can restore it)."""
        found = [self.store.resident(session_id, owner)] if owner else self.store.named(session_id)
        live = [s for s in found if s is not None and not s.ended]
        sessions = [s for s in live if not self.store.expired(s)]
        if len(sessions) > 1:
            raise errors.invalid_request(
                f"{len(sessions)} identities have a session {session_id!r}: name its owner",
                "owner",
            )
        if sessions:
            return sessions[0]
        if live or not self.residency.enabled:
            raise self.store.not_found(session_id, live[0].owner if live else owner)
        if not owner:
            owners = self.config.owners
            if owners is None or len(owners) != 1:
                raise errors.invalid_request(
                    f"session {session_id!r} is not resident on this server: name its owner "
                    "to bring it here from the state store or another replica (session ids "
                    "are per identity)",
                    "owner",
                )
            (owner,) = owners

        def rehome(released: str) -> ModelVersion:
            source = self.repository.released.get(released)
            if source is None:  # never loaded here: its state pairs are not known
                raise RnnserveError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    errors.VERSION_NOT_FOUND,
                    f"session {session_id!r} is parked for model {released}, which this "
                    "server does not load; move it on a server that has that version",
                )
            target = self.repository.for_new_work(source.name, version)
            difference = state_difference(source, target)
            if difference:
                raise RnnserveError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    errors.STATE_INCOMPATIBLE,
                    f"cannot move session {session_id!r} from {released} to {target.key}: "
                    f"{difference}",
                )
            moved_from[:] = [released]
            return target

        await self.residency.ensure_resident(session_id, owner, rehome)
        # Resident now (or NOT_FOUND with why); what follows runs in this turn of the loop,
        # so nothing parks it or queues a step of it in between.
        return self.store.get(session_id, owner)

    def _log_move(self, session: Session, source: str) -> None:
        logger.info(
            "event=session_moved session=%s from=%s to=%s position=%d",
            session.id,
            source,
            session.model.key,
            session.position,
        )

    # -- sessions ----------------------------------------------------------------------------
    async def _session(self, session_id: str, owner: str) -> Session:
        await self.residency.ensure_resident(session_id, owner)
        return self.store.get(session_id, owner)

    async def open_session(
        self,
        model: str,
        version: str,
        session_id: str,
        state: dict[str, np.ndarray],
        position: int,
        owner: str,
    ) -> SessionInfo:
        mv = self.repository.for_new_work(model, version)
        self.batchers[mv.key].checks.state(state, "initial_state")
        # Before room is made: a refused open must not have parked anybody's session.
        self.store.check_open(owner, position)
        session = await self.residency.open(
            mv,
            session_id,
            owner,
            lambda slot: self.store.open(mv, session_id, state, position, owner, slot=slot),
        )
        return session.info()

    async def get_session(self, session_id: str, owner: str) -> SessionInfo:
        return (await self._session(session_id, owner)).info()

    async def export_state(
        self, session_id: str, owner: str
    ) -> tuple[SessionInfo, dict[str, np.ndarray]]:
        session = await self._session(session_id, owner)
        return session.info(), self.store.export(session)

    async def fork_session(self, session_id: str, new_session_id: str, owner: str) -> SessionInfo:
        source = await self._session(session_id, owner)
        if new_session_id:
            check_session_id(new_session_id, "new_session_id")
        self.repository.for_new_work(source.model.name, source.model.version)
        self.store.check_open(owner)  # before room is made, as in open_session

        def opener(slot: int | None) -> Session:
            # State and position read together, once room is made: a step or reset of the
            # source that lands while a state store is awaited moves both, never one.
            if source.ended:
                raise errors.ended_meanwhile(source.id, source.ended, "the fork")
            state = self.store.export(source)
            return self.store.open(
                source.model, new_session_id, state, source.position, owner, "fork", slot
            )

        with self.store.held(source):  # not parked while room is made for the fork
            session = await self.residency.open(source.model, new_session_id, owner, opener)
        return session.info()

    async def reset_session(
        self, session_id: str, state: dict[str, np.ndarray], owner: str
    ) -> SessionInfo:
        session = await self._session(session_id, owner)
        self.batchers[session.model.key].checks.state(state, "state")
        self.store.reset(session, state)
        return session.info()

    async def close_session(self, session_id: str, owner: str) -> None:
        self.store.close(await self._session(session_id, owner))

    def release_later(self, session_ids: list[str], owner: str) -> None:
        """Close a finished stream's sessions (release on disconnect) in a task of the
        engine's, outliving the call (or the frontend process) that ended."""

        async def close() -> None:
            try:
                closed = await self.close_sessions(session_ids, owner)
                logger.info("event=stream_release sessions=%d", closed)
            except Exception:
                logger.exception("event=stream_release_failed")

        task = asyncio.get_running_loop().create_task(close())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def close_sessions(self, session_ids: list[str], owner: str) -> int:
        """Close those of ``session_ids`` still open for ``owner`` (release on disconnect),
        parked ones too: they are brought back to be closed, so none outlives its stream.

        A session that cannot be had *yet* (UNAVAILABLE: moving between replicas, the state
        store out) is asked for again until :data:`RELEASE_RETRY_S` has passed: it lives on,
        so giving up at once left it open after its stream. Only NOT_FOUND means it ended.
        """
        closed = 0
        deadline = time.monotonic() + RELEASE_RETRY_S
        for session_id in session_ids:
            session = self.store.resident(session_id, owner)
            while session is None and self.residency.enabled:
                try:
                    session = await self._session(session_id, owner)
                except RnnserveError as exc:
                    if exc.code != grpc.StatusCode.UNAVAILABLE:
                        break  # ended, or not this caller's: nothing left to close here
                    if time.monotonic() >= deadline:
                        logger.warning(
                            "event=stream_release_incomplete session=%s reason=%s",
                            session_id,
                            exc.reason,
                        )
                        break
                    await asyncio.sleep(exc.retry_after_s or _RELEASE_RETRY_PAUSE_S)
            if session is not None and not session.ended:
                self.store.close(session)
                closed += 1
        return closed

    # -- inference ---------------------------------------------------------------------------
    def submit(self, steps: list[StepIn], owner: str, sink: Sink) -> None:
        """Check and queue ``steps`` of ``owner``; every outcome reaches ``sink``, each session's
        in the order given. Never raises: a step that fails is answered through ``sink``.

        The usual step (its session resident and live, its inputs of a shape seen before) is
        checked and gathered here, and a run of them goes to their batcher in one call; any
        other step takes :meth:`_queue`, which says why it fails or brings its session back.
        """
        self._busy_poll.touch()
        now = time.perf_counter()
        mono = time.monotonic()
        sessions = self.store.sessions
        arriving = self._arriving
        failed: list[Outcome] = []
        batcher: Batcher | None = None  # whose steps ``gathered`` holds
        last_model: ModelVersion | None = None  # the last step's model, and its batcher:
        target: Batcher = None  # type: ignore[assignment]
        gathered: list[Queued] = []
        for step in steps:
            ticket, sid, arrays, digest, expected = step
            key = (owner, sid)
            session = sessions.get(key)
            if (
                session is not None
                and type(arrays) is dict
                and (
                    session.busy
                    or mono - session.last_use <= session.model.config.limits.idle_timeout_s
                )
                and key not in arriving
            ):
                model = session.model
                if model is not last_model:
                    last_model, target = model, self._batcher(model)
                try:
                    timesteps = target.checks.step(arrays, check_values=False)
                except RnnserveError:
                    pass  # answered by _queue below, in the session's turn
                else:
                    if target is not batcher:
                        if gathered:
                            assert batcher is not None
                            failed = self._enqueue(batcher, gathered, sink, failed)
                            gathered = []
                        batcher = target
                    gathered.append(
                        (
                            ticket,
                            sink,
                            session,
                            session.generation,
                            arrays,
                            timesteps,
                            digest,
                            expected,
                            now,
                            key,
                            None,
                        )
                    )
                    continue
            # Steps gathered so far go first: a failure answered in its session's turn must
            # find that session's earlier steps queued.
            if gathered:
                assert batcher is not None
                failed = self._enqueue(batcher, gathered, sink, failed)
                gathered = []
            if self._parks and (key in arriving or session is None):
                self._arrive(step, owner, sink, now)
                continue
            if failed:  # answered before this step may run (see _enqueue)
                sink(failed)
                failed = []
            outcome = self._queue(step, owner, sink, now)
            if outcome is not None:
                failed.append(outcome)
        if gathered:
            assert batcher is not None
            failed = self._enqueue(batcher, gathered, sink, failed)
        if failed:
            sink(failed)

    def _batcher(self, model: ModelVersion) -> Batcher:
        """The batcher of a session's model version: one dict lookup by the version object's
        id (checked against the batcher's own model) instead of formatting its key."""
        batcher = self._batcher_of.get(id(model))
        if batcher is None or batcher.model is not model:
            batcher = self._batcher_of[id(model)] = self.batchers[model.key]
        return batcher

    @staticmethod
    def _enqueue(
        batcher: Batcher, entries: list[Queued], sink: Sink, failed: list[Outcome]
    ) -> list[Outcome]:
        """Queue ``entries`` on ``batcher``; the failures to answer at once, then.

        Failures so far are answered first: the batch may run right in this call (an idle
        batcher starts it at once) and answer a later step of a session whose earlier step
        failed.
        """
        if failed:
            sink(failed)
            failed = []
        for entry, error in batcher.enqueue(entries):
            failed.append(Outcome(entry[0], entry[_KEY][1], error=error, model=batcher.model.key))
        return failed

    def _queue(self, step: StepIn, owner: str, sink: Sink, now: float) -> Outcome | None:
        """Queue one step the long way; the outcome to answer at once, or None (queued, or
        failed and queued to be answered in its session's turn)."""
        ticket, sid, arrays, digest, expected = step
        key = (owner, sid)
        session: Session | None = None
        try:
            session = self.store.get(sid, owner)
            if isinstance(arrays, RnnserveError):
                raise arrays
            batcher = self._batcher(session.model)
            timesteps = batcher.checks.step(arrays, check_values=False)
            entry = (ticket, sink, session, session.generation, arrays, timesteps)
            refused = batcher.enqueue([(*entry, digest, expected, now, key, None)])
            if refused:
                raise refused[0][1]
            return None
        except RnnserveError as error:
            # Answered at once unless an earlier step of the session is still to be answered:
            # then in its turn, behind that one.
            for batcher in self._batcher_list:
                if batcher.has_steps_of(key):
                    batcher.enqueue_failed(failed_in_turn(ticket, sink, key, now, error))
                    return None
            return Outcome(ticket, sid, error=error, model=session.model.key if session else "")

    def _arrive(self, step: StepIn, owner: str, sink: Sink, now: float) -> None:
        """Hold a step of a non-resident session until the session is back (or is not)."""
        sid = step[1]
        waiting = self._arriving.get((owner, sid))
        if waiting is not None:
            waiting.append((step, sink, now))
            return
        self._arriving[(owner, sid)] = [(step, sink, now)]
        task = asyncio.get_running_loop().create_task(self._bring_back(sid, owner))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bring_back(self, sid: str, owner: str) -> None:
        error: RnnserveError | None = None
        try:
            await self.residency.ensure_resident(sid, owner)
        except RnnserveError as exc:
            error = exc
        except Exception:
            logger.exception("event=unpark_failed session=%s", sid)
            error = errors.internal()
        waiting = self._arriving.pop((owner, sid))
        for step, sink, now in waiting:
            if error is not None:
                sink([Outcome(step[0], sid, error=error)])
                continue
            outcome = self._queue(step, owner, sink, now)
            if outcome is not None:
                sink([outcome])

    async def predict(
        self,
        model: str,
        version: str,
        arrays: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        mv: ModelVersion = self.repository.for_new_work(model, version)
        batcher = self.batchers[mv.key]
        batcher.checks.sequence(arrays)
        batcher.checks.state(state, "initial_state")
        # Counted while it runs: a retiring version is released only once none is running.
        self._predicting[id(mv)] = self._predicting.get(id(mv), 0) + 1
        try:
            return await batcher.predict(arrays, state)
        finally:
            left = self._predicting.pop(id(mv)) - 1
            if left:
                self._predicting[id(mv)] = left
            else:
                self.lifecycle.session_left(mv)

    def predicting(self, mv: ModelVersion) -> int:
        """How many Predict calls are running on ``mv``."""
        return self._predicting.get(id(mv), 0)
