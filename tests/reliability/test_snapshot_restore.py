"""Restoring a snapshot never loses a session for good.

A session the restart cannot take back (its model is now smaller than the snapshot, its
identity's quota lower) is left out of the next snapshot; the file it came from must then be
kept, as it is for a session of a version not loaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.snapshot import read_snapshot
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository

OWNER = "tester"


def _set_max_sessions(repository: Path, model: str, count: int) -> None:
    """Lower ``model``'s capacity in its config.toml, as an operator would between runs."""
    config = repository / model / "config.toml"
    text = config.read_text(encoding="utf-8")
    lines = [
        f"max_sessions = {count}" if line.startswith("max_sessions =") else line
        for line in text.splitlines()
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("on_full", ["reject", "evict_lru"])
async def test_sessions_a_lowered_capacity_cannot_restore_are_kept_aside(
    tmp_path: Path, on_full: str
) -> None:
    # Refused by a full model, or restored and then evicted to make room for a later record:
    # either way the next snapshot leaves them out.
    limits = {"max_queue_delay_us": 2000, "max_sessions": 4, "on_full": on_full}
    repository = build_test_repository(tmp_path / "repository", limits)
    path = tmp_path / "sessions.snap"
    config = EngineConfig(snapshot_path=path)
    engine = Engine(load_repository(repository), Metrics(), config)
    await engine.start()
    ids = [
        (await engine.open_session("tiny_rnn", "", f"s{n}", {}, 0, OWNER)).session_id
        for n in range(4)
    ]
    await engine.stop()
    assert {r.session_id for r in read_snapshot(path).sessions} == set(ids)

    _set_max_sessions(repository, "tiny_rnn", 2)
    restarted = Engine(load_repository(repository), Metrics(), config)
    await restarted.start()
    assert len(restarted.store) == 2
    await restarted.stop()  # the new snapshot holds the two restored sessions only

    saved = {r.session_id for r in read_snapshot(path).sessions}
    for kept in tmp_path.glob("sessions.snap.skipped-*"):
        saved |= {r.session_id for r in read_snapshot(kept).sessions}
    assert saved == set(ids), "sessions that could not be restored were lost for good"
