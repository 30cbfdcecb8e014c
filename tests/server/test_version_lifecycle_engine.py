"""Model versions coming and going in the engine itself (no gRPC in between): a version loaded
at run time joins with its own slabs and batcher, a retired one leaves only when its last
session has ended and then gives its memory back, a broken one ends FAILED and touches
nothing, and a session moves only between versions whose state pairs match exactly.
"""

from __future__ import annotations

import asyncio
import gc
import shutil
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.errors import RnnserveError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository, run_reference

from .helpers import Collector, engine_over_pipe, running_engine, slow_runs

OWNER = "tester"
BIG = 200_000  # sessions per version: slabs large enough to see them leave


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The test repository with tiny_lstm at version 1 only; version 2 waits in spare/."""
    root = build_test_repository(tmp_path / "repo", {"max_sessions": BIG})
    shutil.move(root / "tiny_lstm" / "2", tmp_path / "spare-2")
    return root


def _x(seed: int, timesteps: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


async def _step(engine: Engine, sid: str, x: np.ndarray) -> dict[str, np.ndarray]:
    sink = Collector()
    engine.submit([(0, sid, {"x": x}, None, None)], OWNER, sink)
    (outcome,) = await sink.wait_for(1)
    assert outcome.error is None, outcome.error
    assert outcome.outputs is not None
    return {name: value[outcome.row] for name, value in outcome.outputs.items()}


async def _settle(engine: Engine, model: str, version: str, state: str) -> None:
    for _ in range(200):
        found = {(s.model, s.version): s for s in await engine.repository_index()}
        if found[(model, version)].state == state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{model}:{version} never reached {state}: {found[(model, version)]}")


async def test_a_retired_version_leaves_after_its_last_session_and_frees_its_memory(
    repo: Path, tmp_path: Path
) -> None:
    engine = Engine(load_repository(repo), Metrics())
    await engine.start()
    tracemalloc.start()
    try:
        shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
        before_load = tracemalloc.get_traced_memory()[0]
        (loaded,) = await engine.load_model("tiny_lstm", "2")
        assert (loaded.state, loaded.on_disk) == ("READY", True)
        with_v2 = tracemalloc.get_traced_memory()[0]
        v2 = engine.repository.get("tiny_lstm", "2")
        slab_bytes = sum(a.nbytes for a in engine.store.slabs(v2).memory.arrays.values())  # type: ignore[attr-defined]
        assert with_v2 - before_load >= slab_bytes

        sid = (await engine.open_session("tiny_lstm", "2", "", {}, 0, OWNER)).session_id
        got = await _step(engine, sid, _x(1))
        status = await engine.retire_model("tiny_lstm", "2", "ops")
        assert (status.state, status.live_sessions) == ("RETIRING", 1)
        with pytest.raises(RnnserveError) as refused:
            await engine.open_session("tiny_lstm", "2", "", {}, 0, OWNER)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.reason == errors.VERSION_RETIRING
        # Without a version, new sessions get the highest READY one.
        other = await engine.open_session("tiny_lstm", "", "", {}, 0, OWNER)
        assert other.version == "1"
        # The live session goes on, exactly.
        more = await _step(engine, sid, _x(2))
        want = run_reference(repo, "tiny_lstm", "2", {"x": np.concatenate([_x(1), _x(2)])})
        np.testing.assert_allclose(
            np.concatenate([got["Y"], more["Y"]]), want["Y"], rtol=1e-5, atol=1e-5
        )
        assert "tiny_lstm:2" in engine.batchers

        await engine.close_session(sid, OWNER)
        await _settle(engine, "tiny_lstm", "2", "RETIRED")
        assert "tiny_lstm:2" not in engine.batchers
        assert "2" not in engine.repository.models["tiny_lstm"]
        assert engine.catalogue().versions("tiny_lstm") == ["1"]
        with pytest.raises(KeyError):
            engine.store.slabs(v2)
        await asyncio.sleep(0.05)  # the batcher stops and the runner closes on the loop
        assert v2.runner is None
        del v2
        gc.collect()
        released = tracemalloc.get_traced_memory()[0]
        assert with_v2 - released >= slab_bytes  # allocator figures: the slabs are gone
    finally:
        tracemalloc.stop()
        await engine.stop()


async def test_a_broken_version_fails_with_its_reason_and_touches_nothing(
    repo: Path,
) -> None:
    async with running_engine(load_repository(repo)) as engine:
        sid = (await engine.open_session("tiny_gru", "", "", {}, 0, OWNER)).session_id
        first = await _step(engine, sid, _x(1))
        (repo / "tiny_gru" / "2").mkdir()
        (repo / "tiny_gru" / "2" / "model.onnx").write_bytes(b"not an onnx model")
        (failed,) = await engine.load_model("tiny_gru", "2")
        assert failed.state == "FAILED"
        assert "onnxruntime cannot load the model" in failed.reason
        assert "tiny_gru/2/model.onnx" in failed.reason
        assert engine.catalogue().versions("tiny_gru") == ["1"]
        assert "tiny_gru:2" not in engine.batchers
        second = await _step(engine, sid, _x(2))
        want = run_reference(repo, "tiny_gru", "1", {"x": np.concatenate([_x(1), _x(2)])})
        np.testing.assert_allclose(
            np.concatenate([first["Y"], second["Y"]]), want["Y"], rtol=1e-5, atol=1e-5
        )
        # Polling leaves a FAILED version alone until its files change.
        assert await engine.lifecycle.poll() == []


async def test_a_version_whose_graph_disagrees_with_the_config_fails_naming_the_field(
    repo: Path, tmp_path: Path
) -> None:
    async with running_engine(load_repository(repo)) as engine:
        # tiny_rnn's graph under tiny_lstm's config: no initial_c, hidden 6 instead of 8.
        (repo / "tiny_lstm" / "3").mkdir()
        shutil.copy(repo / "tiny_rnn" / "1" / "model.onnx", repo / "tiny_lstm" / "3")
        (failed,) = await engine.load_model("tiny_lstm", "3")
        assert failed.state == "FAILED"
        assert "config.toml: field" in failed.reason
        assert engine.repository.get("tiny_lstm").version == "1"


async def test_moving_the_last_session_off_a_retiring_version_releases_it(
    repo: Path, tmp_path: Path
) -> None:
    shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
    async with running_engine(load_repository(repo)) as engine:
        sid = (await engine.open_session("tiny_lstm", "1", "", {}, 0, OWNER)).session_id
        first = await _step(engine, sid, _x(1))
        state = (await engine.export_state(sid, OWNER))[1]
        assert (await engine.retire_model("tiny_lstm", "1", "ops")).state == "RETIRING"
        moved = await engine.move_session(sid, "", "2")
        assert (moved.version, moved.position) == ("2", 1)
        await _settle(engine, "tiny_lstm", "1", "RETIRED")
        assert "tiny_lstm:1" not in engine.batchers
        after = await _step(engine, sid, _x(2))
        want = run_reference(repo, "tiny_lstm", "2", {"x": _x(2)}, initial_state=state)
        np.testing.assert_allclose(after["Y"], want["Y"], rtol=1e-5, atol=1e-5)
        assert first["Y"].shape == after["Y"].shape


async def test_polling_retries_a_failed_version_once_its_files_change(repo: Path) -> None:
    async with running_engine(load_repository(repo)) as engine:
        shutil.copytree(repo / "tiny_gru", repo / "new_gru")
        config = repo / "new_gru" / "config.toml"
        good = config.read_text()
        config.write_text(good.replace('cell_kind = "gru"', "cell_kind = 5"))
        (failed,) = await engine.lifecycle.poll()
        assert (failed.model, failed.version, failed.state) == ("new_gru", "1", "FAILED")
        assert "new_gru/config.toml" in failed.reason and "cell_kind" in failed.reason
        assert await engine.lifecycle.poll() == []  # unchanged: not retried every round
        config.write_text(good)
        (ready,) = await engine.lifecycle.poll()
        assert (ready.state, ready.reason) == ("READY", "")
        assert engine.catalogue().versions("new_gru") == ["1"]


async def test_the_index_says_when_a_loaded_versions_config_changed(repo: Path) -> None:
    async with running_engine(load_repository(repo)) as engine:
        config = repo / "tiny_rnn" / "config.toml"
        config.write_text(config.read_text().replace("[limits]\n", "[limits]\nmax_timesteps = 9\n"))
        found = {(s.model, s.version): s for s in await engine.repository_index()}
        assert found[("tiny_rnn", "1")].state == "READY"
        assert (
            "config.toml changed since this version was loaded" in found[("tiny_rnn", "1")].reason
        )
        assert found[("tiny_gru", "1")].reason == ""


async def test_move_names_the_owner_when_several_identities_use_the_id(
    repo: Path, tmp_path: Path
) -> None:
    shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
    async with running_engine(load_repository(repo)) as engine:
        for owner in ("alice", "bob"):
            await engine.open_session("tiny_lstm", "1", "shared", {}, 0, owner)
        with pytest.raises(RnnserveError) as ambiguous:
            await engine.move_session("shared", "", "2")
        assert ambiguous.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert ambiguous.value.field == "owner"
        moved = await engine.move_session("shared", "bob", "2")
        assert moved.version == "2"
        assert (await engine.get_session("shared", "alice")).version == "1"
        with pytest.raises(RnnserveError) as missing:
            await engine.move_session("nobody", "", "2")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


async def test_retiring_a_version_lets_its_predicts_in_flight_finish_then_releases_it(
    repo: Path,
) -> None:
    # It used to be released at once (no session on it): its onnxruntime thread was shut
    # down with the queued Predicts cancelled, and those callers never got an answer.
    async with running_engine(load_repository(repo)) as engine:
        x = np.random.default_rng(0).standard_normal((4096, 4)).astype(np.float32)
        calls = [
            asyncio.ensure_future(engine.predict("tiny_lstm", "1", {"x": x}, {})) for _ in range(8)
        ]
        await asyncio.sleep(0)  # all of them started; the first runs on the model's thread
        retiring = await engine.retire_model("tiny_lstm", "1", "ops")
        assert (retiring.state, retiring.live_sessions) == ("RETIRING", 0)
        with pytest.raises(RnnserveError) as refused:
            await engine.predict("tiny_lstm", "1", {"x": x[:2]}, {})
        assert refused.value.reason == errors.VERSION_RETIRING
        want = run_reference(repo, "tiny_lstm", "1", {"x": x})["Y"]
        for outputs, _ in await asyncio.wait_for(asyncio.gather(*calls), 60):
            np.testing.assert_allclose(outputs["Y"], want, rtol=1e-4, atol=1e-5)
        await _settle(engine, "tiny_lstm", "1", "RETIRED")
        assert "tiny_lstm:1" not in engine.batchers


async def test_a_session_with_a_step_queued_is_not_moved(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batchers know queued steps by the session's (owner, id) key, never by its bare id.
    shutil.copytree(tmp_path / "spare-2", repo / "tiny_lstm" / "2")
    async with running_engine(load_repository(repo)) as engine:
        await engine.open_session("tiny_lstm", "1", "s", {}, 0, OWNER)
        batcher = engine.batchers["tiny_lstm:1"]
        monkeypatch.setattr(batcher, "has_steps_of", lambda key: key == (OWNER, "s"))
        with pytest.raises(RnnserveError) as busy:
            await engine.move_session("s", OWNER, "2")
        assert busy.value.reason == errors.SESSION_BUSY
        assert (await engine.get_session("s", OWNER)).version == "1"
        monkeypatch.undo()
        assert (await engine.move_session("s", OWNER, "2")).version == "2"


async def test_an_engine_call_cancelled_in_the_engine_is_still_answered(
    repo: Path, tmp_path: Path
) -> None:
    # A frontend process waits for the engine's reply to every call: a call whose work was
    # cancelled (the engine stopping a run) used to send none, and its caller hung.
    async with engine_over_pipe(load_repository(repo), tmp_path) as (engine, _, client):

        async def cancelled(*args: object) -> None:
            raise asyncio.CancelledError

        engine.repository_index = cancelled  # type: ignore[method-assign]
        with pytest.raises(RnnserveError) as answer:
            await asyncio.wait_for(client.repository_index(), 10)
        assert answer.value.code == grpc.StatusCode.UNAVAILABLE
        del engine.repository_index
        assert await asyncio.wait_for(client.repository_index(), 10)  # the pipe goes on


async def test_a_step_running_when_the_last_session_closes_is_answered_before_the_release(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing the last session of a retiring version while its step ran on the model's
    # thread used to release the version at once: the batcher was stopped mid-run and the
    # step's caller never got an answer.
    async with running_engine(load_repository(repo)) as engine:
        await engine.open_session("tiny_lstm", "1", "s", {}, 0, OWNER)
        slow_runs(monkeypatch, engine, "tiny_lstm:1", 0.3)
        assert (await engine.retire_model("tiny_lstm", "1", "ops")).state == "RETIRING"
        sink = Collector()
        engine.submit([(0, "s", {"x": _x(1)}, None, None)], OWNER, sink)
        await asyncio.sleep(0.1)  # the step runs on the model's thread
        await engine.close_session("s", OWNER)
        (outcome,) = await asyncio.wait_for(sink.wait_for(1), 10)
        assert outcome.error is not None
        assert outcome.error.code == grpc.StatusCode.NOT_FOUND  # ended while it ran
        await _settle(engine, "tiny_lstm", "1", "RETIRED")


async def test_moving_a_session_past_its_idle_timeout_finds_it_expired(tmp_path: Path) -> None:
    # Between two reaper rounds, MoveSession used to bring such a session back to life.
    root = build_test_repository(tmp_path / "idle", {"idle_timeout_s": 1})
    engine = Engine(load_repository(root), Metrics(), EngineConfig(reap_interval_s=60))
    await engine.start()
    try:
        for sid in ("named", "by-id"):
            await engine.open_session("tiny_lstm", "1", sid, {}, 0, OWNER)
        await asyncio.sleep(1.2)
        # The owner named, or the session found by its id alone (an admin's call).
        for sid, owner in (("named", OWNER), ("by-id", "")):
            with pytest.raises(RnnserveError) as moved:
                await engine.move_session(sid, owner, "2")
            assert moved.value.code == grpc.StatusCode.NOT_FOUND
            assert moved.value.reason == errors.SESSION_EXPIRED
            with pytest.raises(RnnserveError) as looked_up:
                await engine.get_session(sid, OWNER)
            assert looked_up.value.reason == errors.SESSION_EXPIRED
    finally:
        await engine.stop()
