"""Moving the session store to and from snapshot records (:mod:`rnnserve.server.engine.snapshot`).

A record keeps a session's state, position and timestamps, and in ``extra`` what a safe
retry needs (the position before its last step, the inputs' digest, the stored outputs), so a
client retrying across a restart gets its stored reply rather than FAILED_PRECONDITION.

With a snapshot key, every record written is signed and every record read must carry a
valid signature (:meth:`Persistence.forged`); and a record must name an owner that the
server's authentication can still produce (:meth:`Persistence.unknown_owner`), else it would
hold a slot nobody can reach.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from ..config import DTYPES
from ..repository import ModelVersion, Repository
from .signing import RecordSigner
from .snapshot import SessionRecord, file_digest, state_mismatch
from .store import Retry, Session, SessionStore

logger = logging.getLogger(__name__)
#: Whether an identity can call this server (so a session it owns can be reached).
OwnerCheck = Callable[[str], bool]
#: In a snapshot record's ``extra``: the token of the session's park whose reply was lost and
#: that the state store could not settle before the snapshot (the park may have been written:
#: the record is settled against the store before it is served again).
PARK_TOKEN = "park_token"
#: With it: the replica (its id in the store's holder records) that made that park.
PARKED_BY = "parked_by"


class Persistence:
    """Turns sessions into snapshot records and back, checking them against the models.

    ``signer`` signs records written and verifies records read (None: neither);
    ``knows_owner`` says whether a record's owner can call this server (None: anyone).
    """

    def __init__(
        self,
        repository: Repository,
        store: SessionStore,
        signer: RecordSigner | None = None,
        knows_owner: OwnerCheck | None = None,
    ) -> None:
        self._repository = repository
        self._store = store
        self._signer = signer
        self._knows_owner = knows_owner
        self._digests = {mv.key: file_digest(mv.model_path) for mv in repository.all()}
        #: Sessions out of the store's lookup that are still this server's to save: parks in
        #: doubt (residency sets it), each with the extras its record carries.
        self.detached: Callable[[], Iterable[tuple[Session, Mapping[str, str]]]] = tuple

    async def collect(self) -> list[SessionRecord]:
        """Every session as a record, and every detached one (:attr:`detached`); runs on the
        event loop, so between batches."""
        records = [self.record(session, state) for session, state in self._store.export_all()]
        for session, extra in self.detached():
            records.append(self.record(session, self._store.export(session), extra))
        return records

    def record(
        self,
        session: Session,
        state: dict[str, np.ndarray],
        extra: Mapping[str, str] | None = None,
    ) -> SessionRecord:
        """One session as a record (shared by snapshots and parking in a state store), signed
        when the server has a snapshot key; ``extra`` joins its extras."""
        record = SessionRecord(
            session_id=session.id,
            model=session.model.name,
            version=session.model.version,
            position=session.position,
            states=state,
            owner=session.owner,
            model_digest=self._digests[session.model.key],
            create_time=session.create_time,
            last_use_time=session.last_use_time,
            extra={**_retry_extra(session.retry), **(extra or {})},
        )
        return record if self._signer is None else self._signer.sign(record)

    def forged(self, record: SessionRecord) -> str | None:
        """Why ``record`` was not written by a server holding the key (bad or no signature),
        or None (also when records are not signed here)."""
        return None if self._signer is None else self._signer.problem(record)

    def unknown_owner(self, record: SessionRecord) -> str | None:
        """Why nobody could reach ``record``'s session here (its owner cannot call this
        server as configured), or None."""
        if self._knows_owner is None or self._knows_owner(record.owner):
            return None
        return (
            f"its owner {record.owner[:64]!r} is not an identity this server authenticates "
            "(a token removed, or authentication changed)"
        )

    def model_of(self, record: SessionRecord) -> ModelVersion | None:
        """The loaded version ``record`` names, if any."""
        return self._repository.models.get(record.model, {}).get(record.version)

    def check(self, record: SessionRecord, onto: ModelVersion | None = None) -> str | None:
        """Why a record cannot be restored into the models now loaded, or None.

        ``onto``: a record of a version no longer loaded, to be restored onto that version
        instead (MoveSession of a session parked on a released version). Its digest is then
        checked against the one its own version had here (kept when it was released: the
        record must come from that very model file) and its state against ``onto``'s.
        """
        own = self.model_of(record)
        model = own if own is not None or onto is None else onto
        if model is None:
            return f"model {record.model} version {record.version} is not loaded"
        if not record.model_digest:
            return "the record names no model digest (every record rnnserve writes has one)"
        written_by = f"{record.model}:{record.version}"
        if record.model_digest != self._digests.get(written_by):
            return f"model {written_by} changed since the snapshot (file digest differs)"
        expected = {
            s.input: (DTYPES[s.dtype].name, tuple(s.session_shape)) for s in model.config.states
        }
        return state_mismatch(record, expected)

    def restore(self, records: tuple[SessionRecord, ...]) -> int:
        """Open every checked record as a session again; how many were restored.

        Least recently used first, so eviction's order survives the restart. Each keeps the
        time it was last used (GetSession reports it) but starts a fresh idle timeout: the
        downtime was not its client's idleness.
        """
        restored = 0
        for record in sorted(records, key=lambda r: r.last_use_time):
            try:
                self.restore_one(record)
            except Exception as exc:  # one bad record must not stop the start
                logger.warning("event=restore_skipped session=%s why=%s", record.session_id, exc)
                continue
            restored += 1
        return restored

    def restore_one(
        self, record: SessionRecord, slot: int | None = None, event: str = "restore"
    ) -> Session:
        """Open one checked record as a session (in ``slot`` when one was reserved)."""
        model = self.model_of(record)
        if model is None:
            raise LookupError(f"model {record.model} version {record.version} is not loaded")
        session = self._store.open(
            model,
            record.session_id,
            record.states,
            record.position,
            owner=record.owner,
            event=event,
            slot=slot,
        )
        if record.create_time:
            session.create_time = record.create_time
        if record.last_use_time:
            session.last_use_time = record.last_use_time
        session.retry = _retry_from(record.extra)
        return session


def _retry_extra(retry: Retry | None) -> dict[str, str]:
    """A session's retry entry as record extras: plain strings, arrays as .npy in base64."""
    if retry is None:
        return {}
    extra = {
        "prev_position": str(retry.prev_position),
        "last_digest": retry.digest.hex(),
        "retry_position": str(retry.position),
    }
    for name, value in retry.outputs.items():
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(value), allow_pickle=False)
        extra[f"retry_output:{name}"] = base64.b64encode(buffer.getvalue()).decode()
    return extra


def _retry_from(extra: Mapping[str, str]) -> Retry | None:
    if "retry_position" not in extra:
        return None
    outputs = {
        key.partition(":")[2]: np.load(io.BytesIO(base64.b64decode(value)), allow_pickle=False)
        for key, value in extra.items()
        if key.startswith("retry_output:")
    }
    return Retry(
        int(extra["prev_position"]),
        bytes.fromhex(extra["last_digest"]),
        int(extra["retry_position"]),
        outputs,
    )
