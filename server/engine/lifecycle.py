"""Model versions coming and going while the engine serves (the AdminService's engine side).

Why a state machine of its own: a stateful server cannot unload a version the way a stateless
one does, because sessions hold state on it. A version therefore moves through
``LOADING -> READY -> RETIRING -> RETIRED``: retiring stops new sessions only, and the
onnxruntime session and the state slabs are released when its last session has ended (closed,
expired, evicted, moved, or handed off to another replica). Sessions this replica parked in a
state store to come back here count as its own: released under them, the version would leave
their clients nothing to come back to. A load that fails (config, ONNX, graph check, warm-up
run) ends ``FAILED`` with its reason and touches nothing that serves: the version is built and
run on a worker thread and joins the engine (slabs, batcher, catalogue) only once it worked.

Polling (``--poll-repository-s``) takes the same path as LoadModel for version folders it has
not seen, and retries a FAILED one only when its files changed (so a broken folder is not
reloaded every round). A retired version left on disk is not reloaded by polling; LoadModel
brings it back. Versions whose folder disappears stay loaded (their sessions go on): retire
them to let them go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np

from .. import errors
from ..config import DTYPES, load_model_config
from ..errors import ConfigError, RnnserveError
from ..repository import ModelVersion, canonical_version, load_version, version_folder
from ..runtime import DeviceChoice, choose_device
from .snapshot import file_digest

if TYPE_CHECKING:
    from .core import Engine

logger = logging.getLogger(__name__)

# The states of rnnserve.v1.VersionState, by name.
AVAILABLE = "AVAILABLE"
LOADING = "LOADING"
READY = "READY"
RETIRING = "RETIRING"
RETIRED = "RETIRED"
FAILED = "FAILED"

#: Session events after which a retiring version may have no session left.
LEAVING_EVENTS = frozenset({"close", "expire", "evict", "park", "move_out"})
#: How soon a retiring version with no session but a slot still held is looked at again.
_MOVING_RECHECK_S = 0.05

Signature = tuple[int, int, int, int]


@dataclass(slots=True, frozen=True)
class VersionStatus:
    """One model version as the index shows it (crosses the engine <-> frontend pipe)."""

    model: str
    version: str
    on_disk: bool
    state: str
    reason: str
    live_sessions: int


@dataclass(slots=True)
class _Entry:
    state: str
    reason: str = ""
    #: The files' (mtime, size) when a load failed: polling retries only once they change.
    signature: Signature | None = None


def disk_versions(root: Path) -> dict[str, list[str]]:
    """Model -> version folders (positive integers) holding a model.onnx, in number order.

    Folders still being written (no model.onnx yet) and names that are not versions are
    not versions yet; startup is stricter (:func:`~rnnserve.server.repository.scan_repository`).
    """
    found: dict[str, list[str]] = {}
    if not root.is_dir():
        return found
    for model_dir in root.iterdir():
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        versions = [
            str(int(d.name))
            for d in model_dir.iterdir()
            if d.is_dir() and d.name.isdigit() and int(d.name) >= 1 and (d / "model.onnx").is_file()
        ]
        if versions:
            found[model_dir.name] = sorted(set(versions), key=int)
    return found


def _signature(root: Path, model: str, version: str) -> Signature:
    def stat(path: Path) -> tuple[int, int]:
        try:
            info = path.stat()
        except OSError:
            return (0, 0)
        return (info.st_mtime_ns, info.st_size)

    model_dir = root / model
    return (
        *stat(model_dir / "config.toml"),
        *stat(version_folder(model_dir, version) / "model.onnx"),
    )


def warm_up(mv: ModelVersion) -> None:
    """One run of one session and one timestep of zeros through the model, as the batcher
    runs it: a version that cannot run (or answers NaN/inf) never takes traffic."""
    assert mv.runner is not None
    config = mv.config
    feeds: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        shape = [1 if extent < 0 else extent for extent in spec.session_shape]
        feeds[spec.name] = np.expand_dims(np.zeros(shape, DTYPES[spec.dtype]), spec.batch_axis)
    for state in config.states:
        zeros = np.zeros(state.session_shape, DTYPES[state.dtype])
        feeds[state.input] = np.expand_dims(zeros, state.batch_axis)
    names = [o.name for o in config.outputs] + [s.output for s in config.states]
    try:
        values = mv.runner.run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{mv.model_path}: the warm-up run failed: {first}") from None
    for name, value in zip(names, values, strict=True):
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ConfigError(f"{mv.model_path}: the warm-up run gave non-finite {name!r}")


def prepare_version(
    root: Path, model: str, version: str, choice: DeviceChoice, tf32: bool = False
) -> tuple[ModelVersion, str]:
    """Read the config, create and check the onnxruntime session (TF32 matmuls on CUDA when
    ``tf32``, as the server's ``--tf32`` says for every version), warm it up (blocking: runs
    on a worker thread); the version and its model file's digest (what session records name).
    :class:`ConfigError` with the reason when any of it fails."""
    config_path = root / model / "config.toml"
    config = load_model_config(config_path)
    model_path = version_folder(root / model, version) / "model.onnx"
    if not model_path.is_file():
        raise ConfigError(f"{model_path}: missing model.onnx")
    mv = ModelVersion(model, version, config, config_path, model_path)
    load_version(mv, choice, tf32)
    try:
        warm_up(mv)
    except ConfigError:
        assert mv.runner is not None
        mv.runner.close()
        mv.runner = None
        raise
    return mv, file_digest(model_path)


def state_difference(source: ModelVersion, target: ModelVersion) -> str:
    """How two versions' state pairs differ (names, per-session shapes, dtypes), or ""."""

    def pairs(mv: ModelVersion) -> dict[str, tuple[str, str, tuple[int, ...]]]:
        return {s.input: (s.output, s.dtype, tuple(s.session_shape)) for s in mv.config.states}

    mine, theirs = pairs(source), pairs(target)
    if mine.keys() != theirs.keys():
        return f"state pairs {sorted(mine)} vs {sorted(theirs)}"
    for name, (output, dtype, shape) in mine.items():
        other = theirs[name]
        if (output, dtype, shape) != other:
            return (
                f"state {name!r} is ({output}, {dtype}, {list(shape)}) on {source.key} but "
                f"({other[0]}, {other[1]}, {list(other[2])}) on {target.key}"
            )
    return ""


class Lifecycle:
    """The states of every model version and the moves between them, for one engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._entries: dict[tuple[str, str], _Entry] = {
            (mv.name, mv.version): _Entry(READY) for mv in engine.repository.all()
        }
        # The config a loaded version was read with ((mtime, size) of its config.toml): a
        # loaded version keeps it; the index says when the file has changed since.
        self._configs: dict[tuple[str, str], tuple[int, int]] = {
            (mv.name, mv.version): _signature(self.root, mv.name, mv.version)[:2]
            for mv in engine.repository.all()
        }
        self._loading: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def root(self) -> Path:
        return self._engine.repository.root

    # -- what is where -----------------------------------------------------------------------
    def state(self, model: str, version: str) -> str:
        entry = self._entries.get((model, version))
        return AVAILABLE if entry is None else entry.state

    def status(
        self, model: str, version: str, disk: dict[str, list[str]] | None = None
    ) -> VersionStatus:
        disk = disk_versions(self.root) if disk is None else disk
        entry = self._entries.get((model, version)) or _Entry(AVAILABLE)
        loaded = self._engine.repository.models.get(model, {}).get(version)
        live = self.live(loaded) if loaded is not None else 0
        reason = entry.reason
        loaded_with = self._configs.get((model, version))
        if loaded is not None and not reason and loaded_with is not None:
            if _signature(self.root, model, version)[:2] != loaded_with:
                reason = (
                    "config.toml changed since this version was loaded; it keeps the config it "
                    "was loaded with, versions loaded from now on use the new one"
                )
        return VersionStatus(
            model, version, version in disk.get(model, []), entry.state, reason, live
        )

    def live(self, mv: ModelVersion) -> int:
        """Sessions of ``mv``: resident, and parked here to come back here."""
        return self._engine.store.count(mv) + self._engine.residency.keeping(mv)

    def index(self) -> list[VersionStatus]:
        """Every version on disk or known here, by model then version number."""
        disk = disk_versions(self.root)
        keys = {(m, v) for m, versions in disk.items() for v in versions} | set(self._entries)
        return [self.status(m, v, disk) for m, v in sorted(keys, key=lambda k: (k[0], int(k[1])))]

    # -- loading -----------------------------------------------------------------------------
    async def load(self, model: str, version: str = "") -> list[VersionStatus]:
        """Load ``model``'s ``version`` (or every version on disk not loaded yet, retired ones
        excepted); the statuses of the versions looked at, after the load."""
        disk = disk_versions(self.root)
        loaded = self._engine.repository.models.get(model, {})
        if model not in disk and not loaded:
            raise RnnserveError(
                grpc.StatusCode.NOT_FOUND,
                errors.MODEL_NOT_FOUND,
                f"no model {model!r} in the repository {self.root}",
            )
        if version:
            version = canonical_version(version)
            if version not in disk.get(model, []) and version not in loaded:
                raise RnnserveError(
                    grpc.StatusCode.NOT_FOUND,
                    errors.VERSION_NOT_FOUND,
                    f"model {model!r} has no version {version!r} on disk "
                    f"(has {disk.get(model, [])})",
                )
            targets = [version]
        else:
            targets = [
                v for v in disk.get(model, []) if self.state(model, v) in (AVAILABLE, FAILED)
            ]
        for target in targets:
            await self._load_one(model, target)
        shown = targets or disk.get(model, [])
        disk = disk_versions(self.root)
        return [self.status(model, v, disk) for v in shown]

    async def _load_one(self, model: str, version: str) -> None:
        key = (model, version)
        state = self.state(model, version)
        if state == READY:
            return
        if state == RETIRING:  # still loaded: it simply takes new sessions again
            mv = self._engine.repository.models[model][version]
            self._engine.repository.retiring.discard(mv.key)
            self._entries[key] = _Entry(READY, "loaded again while retiring")
            self._engine.catalogue_changed()
            logger.info("event=version_ready model=%s version=%s from=retiring", model, version)
            return
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._do_load(model, version))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        # The load goes on if this caller goes away: others may wait on it, and it must end
        # in READY or FAILED either way.
        await asyncio.shield(task)

    async def _do_load(self, model: str, version: str) -> None:
        key = (model, version)
        self._entries[key] = _Entry(LOADING)
        logger.info("event=version_loading model=%s version=%s", model, version)
        signature = _signature(self.root, model, version)
        started = time.perf_counter()
        repository = self._engine.repository
        choice = repository.device or choose_device("auto")
        loop = asyncio.get_running_loop()
        try:
            mv, digest = await loop.run_in_executor(
                None, prepare_version, self.root, model, version, choice, repository.tf32
            )
        except ConfigError as exc:
            self._fail(key, str(exc), signature)
            return
        except Exception as exc:  # noqa: BLE001 - any failure of a new version is its own
            logger.exception("event=version_load_error model=%s version=%s", model, version)
            self._fail(key, f"{type(exc).__name__}: {exc}", signature)
            return
        check = self._engine.config.version_check
        why = check(mv) if check is not None else None
        if why is not None:
            if mv.runner is not None:
                mv.runner.close()
                mv.runner = None
            self._fail(key, why, signature)
            return
        try:
            self._engine.add_version(mv, digest)
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for its slabs
            logger.exception("event=version_add_error model=%s version=%s", model, version)
            if mv.runner is not None:
                mv.runner.close()
            self._fail(key, f"{type(exc).__name__}: {exc}", signature)
            return
        self._entries[key] = _Entry(READY)
        self._configs[key] = signature[:2]
        logger.info(
            "event=version_ready model=%s version=%s load_s=%.3f",
            model,
            version,
            time.perf_counter() - started,
        )

    def _fail(self, key: tuple[str, str], reason: str, signature: Signature) -> None:
        self._entries[key] = _Entry(FAILED, reason, signature)
        logger.error("event=version_failed model=%s version=%s reason=%r", *key, reason)

    # -- retiring ----------------------------------------------------------------------------
    def retire(self, model: str, version: str, by: str) -> VersionStatus:
        """No new sessions on ``model``'s ``version``; released once its last session ends."""
        if not version:
            raise errors.invalid_request("RetireModel needs a version", "version")
        version = canonical_version(version)
        mv = self._engine.repository.models.get(model, {}).get(version)
        if mv is None:
            state = self.state(model, version)
            if state == AVAILABLE and version not in disk_versions(self.root).get(model, []):
                raise RnnserveError(
                    grpc.StatusCode.NOT_FOUND,
                    errors.VERSION_NOT_FOUND,
                    f"model {model!r} has no version {version!r}",
                )
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.VERSION_NOT_READY,
                f"model {model!r} version {version} is not loaded (state {state})",
            )
        if mv.key not in self._engine.repository.retiring:
            self._engine.repository.retiring.add(mv.key)
            self._entries[(model, version)] = _Entry(RETIRING, f"retired by {by}")
            self._engine.catalogue_changed()
            logger.info(
                "event=version_retiring model=%s version=%s by=%s sessions=%d",
                model,
                version,
                by,
                self.live(mv),
            )
        self._release_if_empty(mv)
        return self.status(model, version)

    def session_left(self, mv: ModelVersion) -> None:
        """A session of ``mv`` ended or left it (a parked one too), or a Predict on it ended:
        release ``mv`` if it retires and is empty. Called from the store's event (inside its
        bookkeeping), so the release runs on the next turn of the loop."""
        if mv.key in self._engine.repository.retiring and self.live(mv) == 0:
            asyncio.get_running_loop().call_soon(self._release_if_empty, mv)

    def _release_if_empty(self, mv: ModelVersion) -> None:
        """Take a retiring version with no session out of the engine, then free its memory.

        Empty means no resident session, none parked here to come back here (they wait in
        the state store until they come back and end or move, expire there, or are taken up
        by another replica), no slot held by a session on its way in or out (a park writing
        it to the state store, a session being brought back), no step still to be answered
        and no Predict running on it. Sessions in a move hold a slot and say when they have
        left; a slot reserved by a return that then fails is given back silently, and steps
        end without an event: hence the look again shortly then.
        """
        engine = self._engine
        current = engine.repository.models.get(mv.name, {}).get(mv.version)
        if self._closed or current is not mv or mv.key not in engine.repository.retiring:
            return  # the engine stops, released already, or loaded again meanwhile
        if self.live(mv) > 0 or engine.predicting(mv):
            return  # the last of them says so when it ends
        batcher = engine.batchers.get(mv.key)
        if engine.store.slots_in_use(mv) > 0 or (batcher is not None and batcher.has_work()):
            # A move still holds a slot, or steps of sessions that just ended are still to
            # be answered (stopping the batcher now would leave their callers waiting).
            asyncio.get_running_loop().call_later(_MOVING_RECHECK_S, self._release_if_empty, mv)
            return
        key = (mv.name, mv.version)
        on_disk = mv.version in disk_versions(self.root).get(mv.name, [])
        reason = self._entries.get(key, _Entry(RETIRED)).reason
        if on_disk:
            self._entries[key] = _Entry(RETIRED, reason)
        else:
            self._entries.pop(key, None)
        batcher = engine.remove_version(mv)
        task = asyncio.get_running_loop().create_task(engine.free_version(mv, batcher))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        logger.info("event=version_released model=%s version=%s", mv.name, mv.version)

    # -- polling -----------------------------------------------------------------------------
    async def poll(self) -> list[VersionStatus]:
        """Load every version folder not seen before, and retry FAILED ones whose files
        changed; the statuses of the versions it loaded."""
        loaded: list[VersionStatus] = []
        for model, versions in disk_versions(self.root).items():
            for version in versions:
                entry = self._entries.get((model, version))
                retry = (
                    entry is not None
                    and entry.state == FAILED
                    and entry.signature != _signature(self.root, model, version)
                )
                if entry is None or retry:
                    await self._load_one(model, version)
                    loaded.append(self.status(model, version))
        return loaded

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:  # the poller must outlive one bad round
                logger.exception("event=poll_failed")

    async def close(self) -> None:
        self._closed = True
        for task in list(self._loading.values()) + list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._loading.values(), *self._tasks, return_exceptions=True)
