"""The snapshot file: written atomically, read back bit for bit, refused when damaged."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server.engine.snapshot import (
    SessionRecord,
    SnapshotError,
    Snapshotter,
    file_digest,
    load_snapshot,
    read_snapshot,
    state_mismatch,
    write_snapshot,
)


def _records(count: int, seed: int = 0) -> list[SessionRecord]:
    rng = np.random.default_rng(seed)
    return [
        SessionRecord(
            session_id=f"s{i}",
            model="lstm",
            version="1",
            position=int(rng.integers(0, 10_000)),
            states={
                "initial_h": rng.standard_normal((1, 8)).astype(np.float32),
                "initial_c": rng.standard_normal((1, 8)).astype(np.float32),
            },
            owner=f"user{i % 3}",
            model_digest="ab" * 32,
            create_time=1.5 + i,
            last_use_time=2.5 + i,
        )
        for i in range(count)
    ]


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    records = _records(5)
    assert write_snapshot(path, records, created_at=123.0) == 5
    snapshot = read_snapshot(path)
    assert snapshot.created_at == 123.0
    assert [r.session_id for r in snapshot.sessions] == [r.session_id for r in records]
    for got, want in zip(snapshot.sessions, records, strict=True):
        assert (got.model, got.version, got.position, got.owner) == (
            want.model,
            want.version,
            want.position,
            want.owner,
        )
        assert got.model_digest == want.model_digest
        for name, array in want.states.items():
            assert got.states[name].dtype == array.dtype
            assert got.states[name].tobytes() == array.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["sessions.snap"]  # no temp file left


def test_empty_snapshot_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.snap"
    write_snapshot(path, [], created_at=0.0)
    assert read_snapshot(path).sessions == ()


@pytest.mark.parametrize("where", [0, 9, 20, -40, -1])
def test_any_flipped_byte_is_refused(tmp_path: Path, where: int) -> None:
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(3), created_at=1.0)
    raw = bytearray(path.read_bytes())
    raw[where] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError):
        read_snapshot(path)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(3), created_at=1.0)
    raw = path.read_bytes()
    for size in (0, 10, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:size])
        with pytest.raises(SnapshotError):
            read_snapshot(path)


def test_corrupt_file_is_moved_aside_and_nothing_loaded(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(3), created_at=1.0)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = load_snapshot(path, lambda record: None)
    assert result.accepted == () and result.error is not None
    assert not path.exists()
    assert (tmp_path / "sessions.snap.corrupt").read_bytes() == bytes(raw)


def test_missing_file_is_an_empty_result(tmp_path: Path) -> None:
    result = load_snapshot(tmp_path / "none.snap", lambda record: None)
    assert result.accepted == () and result.rejected == () and result.error is None


def test_mismatched_sessions_are_skipped_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    records = _records(4)
    wrong_shape = SessionRecord(
        session_id="bad-shape",
        model="lstm",
        version="1",
        position=0,
        states={"initial_h": np.zeros((1, 9), np.float32), "initial_c": np.zeros((1, 8))},
    )
    other_version = SessionRecord(
        session_id="old-version", model="lstm", version="7", position=0, states={}
    )
    write_snapshot(path, [*records, wrong_shape, other_version], created_at=1.0)
    expected = {"initial_h": ("float32", (1, 8)), "initial_c": ("float32", (1, 8))}

    def check(record: SessionRecord) -> str | None:
        if record.version != "1":
            return f"version {record.version} is not loaded"
        return state_mismatch(record, expected)

    result = load_snapshot(path, check)
    assert [r.session_id for r in result.accepted] == [r.session_id for r in records]
    reasons = {r.session_id: r.reason for r in result.rejected}
    assert set(reasons) == {"bad-shape", "old-version"}
    assert "initial_" in reasons["bad-shape"] and "version 7" in reasons["old-version"]
    # Kept aside whole: the next snapshot leaves the skipped sessions out.
    (kept,) = tmp_path.glob("sessions.snap.skipped-*")
    assert kept.read_bytes() == path.read_bytes()
    assert {r.session_id for r in read_snapshot(kept).sessions} >= set(reasons)


def test_a_snapshot_restored_whole_is_not_copied(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(3), created_at=1.0)
    assert len(load_snapshot(path, lambda record: None).accepted) == 3
    assert not list(tmp_path.glob("*.skipped-*"))


def test_failed_write_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(2), created_at=1.0)
    before = path.read_bytes()
    unsupported = SessionRecord(
        session_id="x",
        model="m",
        version="1",
        position=0,
        states={"h": np.zeros(2, dtype=np.complex64)},
    )
    with pytest.raises(ValueError):
        write_snapshot(path, [*_records(2), unsupported], created_at=2.0)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["sessions.snap"]


async def test_snapshotter_writes_periodically_and_on_demand(tmp_path: Path) -> None:
    path = tmp_path / "periodic.snap"
    sessions = _records(2)

    async def collect() -> list[SessionRecord]:
        return sessions

    snapshotter = Snapshotter(path, collect, interval_s=0.01)
    task = asyncio.create_task(snapshotter.run_periodically())
    for _ in range(500):  # bounded: at most 5 s
        if snapshotter.written >= 2:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert snapshotter.written >= 2
    sessions = _records(3, seed=1)
    assert await snapshotter.write_now() == 3
    assert [r.position for r in read_snapshot(path).sessions] == [r.position for r in sessions]


def test_a_record_without_a_model_digest_is_not_restored(tmp_path: Path) -> None:
    """Every record rnnserve writes names the model file's digest; one that names none (edited
    by hand, or forged) would skip the check that the state fits the model, so it is refused."""
    from rnnserve.server.engine.persistence import Persistence
    from rnnserve.server.engine.store import SessionStore
    from rnnserve.server.repository import load_repository
    from rnnserve.testing import build_test_repository

    repository = load_repository(build_test_repository(tmp_path / "repository"))
    persistence = Persistence(repository, SessionStore(repository.all()))
    state = {"initial_h": np.zeros((1, 6), np.float32)}
    record = SessionRecord(session_id="s", model="tiny_rnn", version="1", position=3, states=state)
    assert "no model digest" in (persistence.check(record) or "")
    signed = dataclasses.replace(
        record, model_digest=file_digest(repository.get("tiny_rnn").model_path)
    )
    assert persistence.check(signed) is None


def test_the_temporary_file_of_a_write_that_never_finished_is_removed_at_load(
    tmp_path: Path,
) -> None:
    # A process killed mid-write leaves its temporary file (as large as a snapshot) beside
    # the last good one; nothing else would ever remove it.
    path = tmp_path / "sessions.snap"
    write_snapshot(path, _records(3), created_at=1.0)
    partial = tmp_path / ".sessions.snap.k3x9a.tmp"
    partial.write_bytes(path.read_bytes()[:100])
    other = tmp_path / ".other.snap.k3x9a.tmp"  # another snapshot's: not this one's to remove
    other.write_bytes(b"x")
    result = load_snapshot(path, lambda record: None)
    assert len(result.accepted) == 3
    assert not partial.exists() and other.exists()
