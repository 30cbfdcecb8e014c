"""Moving the session store to and from snapshot records (:mod:`rnnserve.server.snapshot`).

A record keeps a session's state, position and timestamps, and in ``extra`` what a safe
retry needs (the position before its last step, the inputs' digest, the stored reply), so a
client retrying across a restart gets its stored reply rather than FAILED_PRECONDITION.
"""

from __future__ import annotations

import base64
import logging

import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb

from .config import DTYPES
from .repository import ModelVersion, Repository
from .sessions import Session, SessionStore
from .snapshot import SessionRecord, file_digest, state_mismatch

logger = logging.getLogger(__name__)


class Persistence:
    """Turns sessions into snapshot records and back, checking them against the models."""

    def __init__(self, repository: Repository, store: SessionStore) -> None:
        self._repository = repository
        self._store = store
        self._digests = {mv.key: file_digest(mv.model_path) for mv in repository.all()}

    async def collect(self) -> list[SessionRecord]:
        """Every session as a record; runs on the event loop, so between batches."""
        return [self.record(session, state) for session, state in self._store.export_all()]

    def record(self, session: Session, state: dict[str, np.ndarray]) -> SessionRecord:
        """One session as a record (shared by snapshots and parking in a state store)."""
        extra: dict[str, str] = {}
        if session.last_reply is not None:
            extra = {
                "prev_position": str(session.prev_position),
                "last_digest": session.last_digest.hex(),
                "last_reply": base64.b64encode(session.last_reply.SerializeToString()).decode(),
            }
        return SessionRecord(
            session_id=session.id,
            model=session.model.name,
            version=session.model.version,
            position=session.position,
            states=state,
            owner=session.owner,
            model_digest=self._digests[session.model.key],
            create_time=session.create_time,
            last_use_time=session.last_use_time,
            extra=extra,
        )

    def _model(self, record: SessionRecord) -> ModelVersion | None:
        return self._repository.models.get(record.model, {}).get(record.version)

    def check(self, record: SessionRecord) -> str | None:
        """Why a record cannot be restored into the models now loaded, or None."""
        model = self._model(record)
        if model is None:
            return f"model {record.model} version {record.version} is not loaded"
        if record.model_digest and record.model_digest != self._digests[model.key]:
            return f"model {model.key} changed since the snapshot (file digest differs)"
        expected = {
            s.input: (DTYPES[s.dtype].name, tuple(s.session_shape)) for s in model.config.states
        }
        return state_mismatch(record, expected)

    def restore(self, records: tuple[SessionRecord, ...]) -> int:
        """Open every checked record as a session again; how many were restored."""
        restored = 0
        for record in records:
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
        model = self._model(record)
        if model is None:
            raise LookupError(f"model {record.model} version {record.version} is not loaded")
        session = self._store.open(
            model,
            record.session_id,
            record.states,
            record.position,
            event=event,
            owner=record.owner,
            slot=slot,
        )
        if record.create_time:
            session.create_time = record.create_time
        if "last_reply" in record.extra:
            session.prev_position = int(record.extra["prev_position"])
            session.last_digest = bytes.fromhex(record.extra["last_digest"])
            session.last_reply = pb.StepResponse.FromString(
                base64.b64decode(record.extra["last_reply"])
            )
        return session
