"""A snapshot edited with its checksum recomputed cannot stop a start.

Whoever can write the snapshot file can recompute its SHA-256 over any header; such a file
must be refused like a damaged one (moved aside, the server starts with no sessions), never
raise out of the start, which would then fail at every restart.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server.engine.snapshot import MAGIC, SessionRecord, load_snapshot, write_snapshot


def _rewrite(path: Path, edit_header: bytes) -> None:
    """Replace ``path``'s header with ``edit_header`` and recompute its checksum, as anyone
    who can write the file can."""
    raw = path.read_bytes()
    prefix = struct.Struct("<8sIQ")
    magic, version, header_len = prefix.unpack_from(raw)
    assert magic == MAGIC
    payload = raw[prefix.size + header_len : -32]
    body = prefix.pack(magic, version, len(edit_header)) + edit_header + payload
    path.write_bytes(body + hashlib.sha256(body).digest())


def _header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    (header_len,) = struct.unpack_from("<Q", raw, 12)
    header: dict[str, object] = json.loads(raw[20 : 20 + header_len])
    return header


@pytest.mark.parametrize("field", ["position", "create_time", "offset", "nesting"])
def test_an_edited_snapshot_with_a_valid_checksum_is_refused_not_raised(
    tmp_path: Path, field: str
) -> None:
    path = tmp_path / "sessions.snap"
    record = SessionRecord(
        session_id="s0",
        model="tiny_rnn",
        version="1",
        position=3,
        states={"initial_h": np.zeros((1, 6), np.float32)},
        model_digest="ab" * 32,
    )
    write_snapshot(path, [record], created_at=1.0)
    header = _header(path)
    text = json.dumps(header, separators=(",", ":"))
    if field == "position":  # JSON's 1e999 is an infinite float: int() overflows
        text = text.replace('"position":3', '"position":1e999')
    elif field == "create_time":  # an integer too large for a float
        text = text.replace('"create_time":0.0', '"create_time":' + "9" * 400)
    elif field == "offset":
        text = text.replace('"offset":0', '"offset":-1e999')
    else:  # nested deeper than the JSON parser recurses
        text = text.replace('"extra":{}', '"extra":' + "[" * 100_000 + "]" * 100_000)
    assert text != json.dumps(header, separators=(",", ":"))
    _rewrite(path, text.encode())

    result = load_snapshot(path, lambda r: None)
    assert result.accepted == () and result.error is not None
    assert (tmp_path / "sessions.snap.corrupt").exists() and not path.exists()
