"""Signed session records: who may write a snapshot or a parked session that the server loads.

A snapshot's SHA-256 catches damage, not forgery: whoever can write the file (or the Redis
entry) can recompute it, and so hand a session to another owner or restore any state. With
authentication on, sessions belong to identities, so every record the server writes carries
an HMAC-SHA256 under a key only the servers hold (``--snapshot-key-file`` or
``RNNSERVE_SNAPSHOT_KEY``), and a record whose signature is missing or wrong is refused.

The signature covers everything restored: id, owner, model, version, model digest, position,
timestamps, the retry entry (``extra``) and every state tensor's dtype, shape and bytes. It
is computed from the record's values, not from where they sit in a file, so the same record
signs alike in a snapshot of many sessions and in a Redis entry of one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .snapshot import SessionRecord, record_fields

KEY_ENV = "RNNSERVE_SNAPSHOT_KEY"
#: The shortest key accepted: HMAC-SHA256's own block of entropy, 32 bytes.
MIN_KEY_BYTES = 32


class RecordSigner:
    """Signs and verifies :class:`SessionRecord` values with one HMAC-SHA256 key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a snapshot key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key

    def signature(self, record: SessionRecord) -> str:
        return hmac.new(self._key, _message(record), hashlib.sha256).hexdigest()

    def sign(self, record: SessionRecord) -> SessionRecord:
        """``record`` with its signature set."""
        return replace(record, signature=self.signature(record))

    def problem(self, record: SessionRecord) -> str | None:
        """Why ``record`` must not be trusted (no signature, or a wrong one), or None."""
        if not record.signature:
            return "the record is not signed (written without a snapshot key?)"
        if not hmac.compare_digest(record.signature, self.signature(record)):
            return "its signature does not match (edited, or signed with another key)"
        return None


def _message(record: SessionRecord) -> bytes:
    """The bytes a signature covers: the record's fields as canonical JSON, then each state
    tensor's little-endian bytes in name order."""
    states = {
        name: {"dtype": array.dtype.name, "shape": list(array.shape)}
        for name, array in record.states.items()
    }
    fields = record_fields(record, states)
    parts = [json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()]
    for name in sorted(record.states):
        array = np.ascontiguousarray(record.states[name])
        parts.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    return b"\0".join(parts)


def load_key(key_file: Path | None, environ: Mapping[str, str] = os.environ) -> bytes | None:
    """The snapshot key from ``--snapshot-key-file`` (it wins) or ``RNNSERVE_SNAPSHOT_KEY``;
    None when neither is set. Surrounding whitespace is not part of the key."""
    if key_file is not None:
        try:
            key = Path(key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(
                f"--snapshot-key-file {key_file}: cannot read: {exc.strerror}"
            ) from None
        source = f"--snapshot-key-file {key_file}"
    elif environ.get(KEY_ENV):
        key = environ[KEY_ENV].strip().encode()
        source = KEY_ENV
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{source}: the key is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed "
            "(e.g. `head -c 48 /dev/urandom | base64`)"
        )
    return key
