"""Session snapshots: every session's state written to one file, so a restart loses none.

A snapshot is written atomically (a temporary file in the same folder, fsync, rename, fsync
of the folder), so a crash while writing leaves the previous snapshot intact, never half of
a new one. It is read back only if it proves whole and made for the models now loaded:

- the file must start with the magic bytes and a format version this code knows;
- a SHA-256 over everything before the last 32 bytes must equal those bytes;
- each session names its model, version and (optionally) a digest of the model file, and a
  session whose model is gone, whose version or digest differs, or whose state tensors no
  longer fit the model's state specs is reported and skipped.

A file that fails the first two checks is moved aside (``<name>.corrupt``) and nothing in it
is loaded. The checksum proves a file whole, not who wrote it: with a snapshot key each
session also carries an HMAC signature (``signature``, :mod:`.signing`), checked by the
server per session on restore. Layout (all integers little-endian)::

    b"RNNSNAP\\0" | u32 format version | u64 header length | header (UTF-8 JSON)
    | payload (every state tensor's raw bytes, back to back) | sha256 of all the above

The domain here knows nothing of gRPC or onnxruntime: the server turns its sessions into
:class:`SessionRecord` values and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"RNNSNAP\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_DIGEST_BYTES = 32
_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64"})


class SnapshotError(Exception):
    """A snapshot file that must not be loaded: unreadable, corrupt or of an unknown format."""


@dataclass(frozen=True)
class SessionRecord:
    """One session as it is saved: identity, bookkeeping and state tensors by pair name."""

    session_id: str
    model: str
    version: str
    position: int
    states: Mapping[str, np.ndarray]
    owner: str = "anonymous"
    model_digest: str = ""
    create_time: float = 0.0
    last_use_time: float = 0.0
    extra: Mapping[str, str] = field(default_factory=dict)
    #: HMAC-SHA256 of the record (hex) when the server signs records (:mod:`.signing`).
    signature: str = ""


@dataclass(frozen=True)
class Snapshot:
    """The verified contents of a snapshot file."""

    created_at: float
    sessions: tuple[SessionRecord, ...]


@dataclass(frozen=True)
class Rejected:
    """A session a snapshot held that was not restored, and why."""

    session_id: str
    reason: str


def record_fields(record: SessionRecord, states: dict[str, Any]) -> dict[str, Any]:
    """A record's fields as the snapshot header lists them (``states`` as given), without
    its signature: what the file stores and what a signature covers."""
    return {
        "session_id": record.session_id,
        "model": record.model,
        "version": record.version,
        "model_digest": record.model_digest,
        "position": record.position,
        "owner": record.owner,
        "create_time": record.create_time,
        "last_use_time": record.last_use_time,
        "extra": dict(record.extra),
        "states": states,
    }


def encode_sessions(sessions: Iterable[SessionRecord], *, created_at: float) -> bytes:
    """The snapshot bytes of ``sessions``: the one encoding files and the state store share.

    A parked session (``state_store``) is a snapshot of one session, so it carries the same
    magic, format version and checksum as a file does.
    """
    entries: list[dict[str, object]] = []
    blobs: list[bytes] = []
    offset = 0
    for record in sessions:
        states: dict[str, dict[str, object]] = {}
        for name, array in sorted(record.states.items()):
            contiguous = np.ascontiguousarray(array)
            dtype = contiguous.dtype.name
            if dtype not in _DTYPES:
                raise ValueError(f"session {record.session_id!r} state {name!r}: dtype {dtype}")
            data = contiguous.astype(contiguous.dtype.newbyteorder("<"), copy=False).tobytes()
            states[name] = {
                "dtype": dtype,
                "shape": list(contiguous.shape),
                "offset": offset,
                "nbytes": len(data),
            }
            blobs.append(data)
            offset += len(data)
        entries.append({**record_fields(record, states), "signature": record.signature})
    header = json.dumps(
        {"created_at": created_at, "payload_bytes": offset, "sessions": entries},
        separators=(",", ":"),
    ).encode()
    body = b"".join((_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)), header, *blobs))
    return body + hashlib.sha256(body).digest()


def decode_sessions(raw: bytes, source: str) -> Snapshot:
    """Verify and decode snapshot bytes; :class:`SnapshotError` names ``source`` if bad."""
    if len(raw) < _PREFIX.size + _DIGEST_BYTES:
        raise SnapshotError(f"{source}: truncated ({len(raw)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(raw)
    if magic != MAGIC:
        raise SnapshotError(f"{source}: not an rnnserve snapshot (bad magic)")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{source}: format version {version}, this server reads {FORMAT_VERSION}"
        )
    body, digest = raw[:-_DIGEST_BYTES], raw[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{source}: checksum mismatch (file corrupt or truncated)")
    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + header_len])
        payload = memoryview(body)[_PREFIX.size + header_len :]
        if header["payload_bytes"] != len(payload):
            raise ValueError("payload length differs from the header")
        sessions = tuple(_record(entry, payload) for entry in header["sessions"])
        created_at = float(header["created_at"])
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        # The checksum proves the bytes whole, not well-formed: whoever can write the file can
        # recompute it over any header, so a number JSON reads as infinite (or too large for
        # a float) or nesting deeper than the parser recurses must be refused like any other
        # damage, not raised out of the start (which would then fail at every restart).
        raise SnapshotError(f"{source}: malformed header: {exc}") from exc
    return Snapshot(created_at=created_at, sessions=sessions)


def write_snapshot(path: Path, sessions: Iterable[SessionRecord], *, created_at: float) -> int:
    """Write ``sessions`` to ``path`` atomically and return how many were written.

    The bytes go to a temporary file next to ``path``, are flushed to disk, and only then
    renamed over ``path``; a crash at any point leaves either the old file or the new one.
    """
    records = list(sessions)
    data = encode_sessions(records, created_at=created_at)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return len(records)


def read_snapshot(path: Path) -> Snapshot:
    """Read and verify a snapshot; raise :class:`SnapshotError` if it must not be loaded."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read: {exc.strerror}") from exc
    return decode_sessions(raw, str(path))


@dataclass(frozen=True)
class RestoreResult:
    """What a snapshot gave back: sessions to restore, sessions skipped, or a file error."""

    accepted: tuple[SessionRecord, ...] = ()
    rejected: tuple[Rejected, ...] = ()
    error: str | None = None


def load_snapshot(path: Path, check: Callable[[SessionRecord], str | None]) -> RestoreResult:
    """Read ``path`` and split its sessions into those to restore and those rejected.

    ``check`` returns ``None`` for a session that fits the models now loaded, else the
    reason it does not. A missing file is an empty result. A corrupt one is logged, moved to
    ``<name>.corrupt`` so the evidence stays (and the next snapshot does not overwrite it),
    and yields nothing but its ``error``: a server still starts, with no sessions. When
    sessions are skipped (a version not loaded, a key or owner not known), the file is
    copied to ``<name>.skipped-<UTC time>`` first: the next snapshot leaves them out, and a
    start with the wrong settings must not lose them for good.
    """
    path = Path(path)
    _remove_partial_writes(path)
    if not path.exists():
        return RestoreResult()
    try:
        snapshot = read_snapshot(path)
    except SnapshotError as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        logger.error("snapshot rejected, nothing restored: %s (moved to %s)", exc, aside)
        return RestoreResult(error=str(exc))
    accepted: list[SessionRecord] = []
    rejected: list[Rejected] = []
    for record in snapshot.sessions:
        reason = check(record)
        if reason is None:
            accepted.append(record)
        else:
            rejected.append(Rejected(record.session_id, reason))
            logger.warning("snapshot session %s skipped: %s", record.session_id, reason)
    if rejected:
        keep_copy(path, len(rejected))
    return RestoreResult(accepted=tuple(accepted), rejected=tuple(rejected))


def _remove_partial_writes(path: Path) -> None:
    """Remove the temporary files of writes that never finished (:func:`write_snapshot`, its
    process killed before the rename): each is as large as a whole snapshot, nothing reads
    it, and nothing else would ever remove it."""
    for partial in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            size = partial.stat().st_size
            partial.unlink()
            logger.warning(
                "snapshot: removed %s (%d bytes), a write that never finished", partial, size
            )


def keep_copy(path: Path, skipped: int) -> Path:
    """Copy the snapshot at ``path`` to ``<name>.skipped-<UTC time>`` and log it: ``skipped``
    of its sessions were not restored, and the next snapshot, written over ``path``, leaves
    them out, so without the copy they would be lost for good."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.skipped-{stamp}")
    shutil.copy2(path, kept)
    logger.warning("snapshot: %d sessions skipped, kept in %s", skipped, kept)
    return kept


def state_mismatch(
    record: SessionRecord, expected: Mapping[str, tuple[str, tuple[int, ...]]]
) -> str | None:
    """Why ``record``'s state tensors do not fit ``expected`` (name -> dtype, shape), or None."""
    if set(record.states) != set(expected):
        return f"state pairs {sorted(record.states)} differ from the model's {sorted(expected)}"
    for name, (dtype, shape) in expected.items():
        array = record.states[name]
        if array.dtype.name != dtype or tuple(array.shape) != tuple(shape):
            return (
                f"state {name!r} is {array.dtype.name}{list(array.shape)}, "
                f"the model wants {dtype}{list(shape)}"
            )
    return None


class Snapshotter:
    """Writes the server's sessions to one path: every ``interval_s`` and once at shutdown.

    ``collect`` returns a consistent copy of every session (the server takes it between
    batches, so no step is half in it); the file is written off the event loop. A failed
    periodic write is logged and retried at the next tick: losing one snapshot must not stop
    the server.
    """

    def __init__(
        self,
        path: Path,
        collect: Callable[[], Awaitable[Sequence[SessionRecord]]],
        interval_s: float | None = None,
    ) -> None:
        self.path = Path(path)
        self._collect = collect
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self.written = 0

    async def write_now(self) -> int:
        """Snapshot every session now; returns how many were written."""
        async with self._lock:
            records = await self._collect()
            count = await asyncio.to_thread(
                write_snapshot, self.path, records, created_at=time.time()
            )
            self.written += 1
            return count

    async def run_periodically(self) -> None:
        """Run until cancelled, writing a snapshot every ``interval_s`` (if set)."""
        if not self._interval_s:
            return
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.write_now()
            except (OSError, ValueError):
                logger.exception("periodic snapshot to %s failed", self.path)


def file_digest(path: Path) -> str:
    """SHA-256 of a model file, saved with each session so a changed model is noticed."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _record(entry: Mapping[str, object], payload: memoryview) -> SessionRecord:
    """Rebuild one session from its header entry and the shared payload."""
    states: dict[str, np.ndarray] = {}
    raw_states = entry["states"]
    if not isinstance(raw_states, dict):
        raise TypeError("states must be a table")
    for name, spec in raw_states.items():
        dtype = spec["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"state {name!r}: unknown dtype {dtype!r}")
        shape = tuple(int(n) for n in spec["shape"])
        start, nbytes = int(spec["offset"]), int(spec["nbytes"])
        item = np.dtype(dtype).newbyteorder("<")
        if start < 0 or start + nbytes > len(payload) or nbytes != item.itemsize * _prod(shape):
            raise ValueError(f"state {name!r}: bytes do not match its shape")
        states[name] = (
            np.frombuffer(payload[start : start + nbytes], dtype=item).astype(dtype).reshape(shape)
        )
    extra = entry.get("extra") or {}
    if not isinstance(extra, dict):
        raise TypeError("extra must be a table")
    return SessionRecord(
        session_id=str(entry["session_id"]),
        model=str(entry["model"]),
        version=str(entry["version"]),
        position=int(entry["position"]),  # type: ignore[call-overload]
        states=states,
        owner=str(entry.get("owner", "anonymous")),
        model_digest=str(entry.get("model_digest", "")),
        create_time=float(entry.get("create_time", 0.0)),  # type: ignore[arg-type]
        last_use_time=float(entry.get("last_use_time", 0.0)),  # type: ignore[arg-type]
        extra={str(k): str(v) for k, v in extra.items()},
        signature=str(entry.get("signature", "")),
    )


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for extent in shape:
        if extent < 0:
            raise ValueError("negative extent")
        total *= extent
    return total


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX needs the folder synced too)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
