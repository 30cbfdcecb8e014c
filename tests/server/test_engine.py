"""The engine on its own, fed in-process: what it commits, in what order, and what it refuses.

These drive :class:`rnnserve.server.engine.core.Engine` directly (real onnxruntime, the tiny
test models) with arrays, the way frontends do, so the engine's own guarantees are shown
without gRPC in between: outputs checked before anything is committed, a session's answers
in the order its steps came, one batch for a crowd.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository, run_reference

from .helpers import Collector, running_engine, slow_runs

OWNER = "tester"


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(
        tmp_path_factory.mktemp("engine-repo"),
        {"max_queue_delay_us": 20000, "max_sessions": 64},
    )


async def _open(engine: Engine, count: int) -> list[str]:
    """Ids of ``count`` new tiny_lstm sessions of OWNER."""
    return [
        (await engine.open_session("tiny_lstm", "", "", {}, 0, OWNER)).session_id
        for _ in range(count)
    ]


def _x(seed: int, timesteps: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


async def test_a_crowd_runs_as_one_batch_and_each_session_gets_its_own_rows(
    repo_path: Path,
) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        ids = await _open(engine, 12)
        sink = Collector()
        engine.submit(
            [(n, sid, {"x": _x(n)}, None, None) for n, sid in enumerate(ids)], OWNER, sink
        )
        outcomes = await sink.wait_for(len(ids))
        batches = engine.metrics.batch_size.labels("tiny_lstm", "2")._sum.get()  # noqa: SLF001
        assert batches == len(ids)  # one observation of 12: a single run
        for outcome in outcomes:
            assert outcome.error is None
            want = run_reference(repo_path, "tiny_lstm", "2", {"x": _x(outcome.ticket)})
            got = outcome.outputs["Y"][outcome.row]  # type: ignore[index]
            np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-5)
            assert outcome.position == 1


async def test_failed_steps_are_answered_in_their_sessions_order(repo_path: Path) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        sid = (await engine.open_session("tiny_rnn", "", "", {}, 0, OWNER)).session_id
        bad = np.zeros((1, 3), np.float32)
        sink = Collector()
        steps = [
            (0, sid, {"x": _x(0)}, None, None),
            (1, sid, {"x": bad}, None, None),  # fails its checks while step 0 is queued
            (2, sid, {"x": _x(2)}, None, None),
            (3, sid, errors.invalid("undecodable"), None, None),
            (4, sid, {"x": _x(4)}, None, None),
        ]
        engine.submit(steps, OWNER, sink)
        outcomes = await sink.wait_for(len(steps))
        assert [o.ticket for o in outcomes] == [0, 1, 2, 3, 4]
        assert [o.error is None for o in outcomes] == [True, False, True, False, True]
        assert [o.position for o in outcomes if o.error is None] == [1, 2, 3]


@pytest.mark.parametrize("mistake", ["output batch axis of fixed extent", "state axes swapped"])
async def test_a_config_that_misplaces_the_batch_axis_never_mixes_sessions(
    repo_path: Path, mistake: str
) -> None:
    """Configs that describe the graph wrongly (the load-time checks refuse them; here they are
    forced past those checks): a batch of several sessions never commits, and each step is run
    again alone, where it gets exactly its own outputs, never another session's rows."""
    repository = load_repository(repo_path)
    model = repository.get("tiny_gru")
    config = model.config
    if mistake == "output batch axis of fixed extent":
        # Y is (T, num_directions=1, B, H): axis 1 is the fixed num_directions axis.
        wrong = config.outputs[0].model_copy(update={"batch_axis": 1})
        model.config = config.model_copy(update={"outputs": [wrong]})
    else:
        # initial_h is (1, B, H): declaring batch axis 0 swaps it with num_directions.
        wrong_state = config.states[0].model_copy(update={"batch_axis": 0, "shape": [-1, 1, 7]})
        model.config = config.model_copy(update={"states": [wrong_state]})
    async with running_engine(repository) as engine:
        ids = [
            (await engine.open_session("tiny_gru", "", "", {}, 0, OWNER)).session_id
            for _ in range(3)
        ]
        sink = Collector()
        engine.submit(
            [(n, sid, {"x": _x(n)}, None, None) for n, sid in enumerate(ids)], OWNER, sink
        )
        outcomes = await sink.wait_for(3)
        batch_sizes = engine.metrics.batch_size.labels("tiny_gru", "1")
        assert batch_sizes._sum.get() > 3  # noqa: SLF001 (the batch of 3, then runs alone)
        for outcome in outcomes:
            assert outcome.error is None
            want = run_reference(repo_path, "tiny_gru", "1", {"x": _x(outcome.ticket)})
            got = outcome.outputs["Y"][outcome.row]  # type: ignore[index]
            np.testing.assert_allclose(
                got.reshape(want["Y"].shape), want["Y"], rtol=1e-5, atol=1e-5
            )
            info, state = await engine.export_state(outcome.session_id, OWNER)
            assert info.position == 1
            np.testing.assert_allclose(
                state["initial_h"].reshape(want["initial_h"].shape),
                want["initial_h"],
                rtol=1e-5,
                atol=1e-5,
            )


async def test_a_step_past_the_largest_position_is_refused_and_changes_nothing(
    repo_path: Path,
) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        near = errors.MAX_POSITION - 1
        sid = (await engine.open_session("tiny_rnn", "", "", {}, near, OWNER)).session_id
        other = (await engine.open_session("tiny_rnn", "", "", {}, 0, OWNER)).session_id
        sink = Collector()
        engine.submit(
            [(0, sid, {"x": _x(0, 2)}, None, None), (1, other, {"x": _x(1, 2)}, None, None)],
            OWNER,
            sink,
        )
        by_ticket = {o.ticket: o for o in await sink.wait_for(2)}
        assert by_ticket[0].error is not None
        assert by_ticket[0].error.reason == errors.POSITION_LIMIT
        assert by_ticket[1].error is None and by_ticket[1].position == 2
        assert (await engine.get_session(sid, OWNER)).position == near


async def test_a_retry_is_answered_from_stored_arrays(repo_path: Path) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        sid = (await engine.open_session("tiny_lstm", "", "", {}, 0, OWNER)).session_id
        sink = Collector()
        step = (0, sid, {"x": _x(5)}, b"digest-of-x", 0)
        engine.submit([step], OWNER, sink)
        first = (await sink.wait_for(1))[0]
        engine.submit([(1, *step[1:])], OWNER, sink)
        retry = (await sink.wait_for(2))[1]
        assert retry.error is None and retry.position == first.position == 1
        np.testing.assert_array_equal(
            retry.outputs["Y"][retry.row],  # type: ignore[index]
            first.outputs["Y"][first.row],  # type: ignore[index]
        )
        assert (await engine.get_session(sid, OWNER)).position == 1  # applied once


async def test_another_identity_cannot_tell_a_closed_session_from_an_unknown_one(
    repo_path: Path,
) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        sid = (await engine.open_session("tiny_rnn", "", "mine", {}, 0, OWNER)).session_id
        await engine.close_session(sid, OWNER)
        with pytest.raises(errors.RnnserveError) as own:
            await engine.get_session(sid, OWNER)
        with pytest.raises(errors.RnnserveError) as other:
            await engine.get_session(sid, "someone-else")
        assert own.value.reason == errors.SESSION_CLOSED
        assert other.value.reason == errors.SESSION_NOT_FOUND


async def test_a_nan_step_fails_alone_and_its_batch_runs_without_it(repo_path: Path) -> None:
    async with running_engine(load_repository(repo_path)) as engine:
        ids = await _open(engine, 4)
        poisoned = _x(1)
        poisoned[0, 2] = np.nan
        inputs = [_x(0), poisoned, _x(2), _x(3)]
        sink = Collector()
        engine.submit(
            [(n, sid, {"x": inputs[n]}, None, None) for n, sid in enumerate(ids)], OWNER, sink
        )
        by_ticket = {o.ticket: o for o in await sink.wait_for(4)}
        assert by_ticket[1].error is not None
        assert by_ticket[1].error.reason == errors.INVALID_TENSOR
        assert (await engine.get_session(ids[1], OWNER)).position == 0
        for n in (0, 2, 3):
            assert by_ticket[n].error is None and by_ticket[n].position == 1
            want = run_reference(repo_path, "tiny_lstm", "2", {"x": inputs[n]})
            got = by_ticket[n].outputs["Y"][by_ticket[n].row]  # type: ignore[index]
            np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-5)


SUMMING_CONFIG = """\
cell_kind = "sum"

[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, -1, -1]
batch_axis = 1
time_axis = 0

[[outputs]]
name = "Y"
dtype = "float32"
shape = [1, -1, 1]
batch_axis = 1

[[states]]
input = "h"
output = "total"
dtype = "float32"
shape = [1, -1, 1]
batch_axis = 1

[limits]
max_queue_delay_us = 20000
"""


def _summing_repository(root: Path) -> Path:
    """A model whose input's feature axis is dynamic in the graph too: x (T, N, F) of any F;
    its state, and its output Y, is the running sum of every value it was given."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=1),
            helper.make_node("Add", ["h", "sum"], ["total"]),
            helper.make_node("Identity", ["total"], ["Y"]),
        ],
        "summing",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", "F"]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, "N", 1]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "N", 1]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, "N", 1]),
        ],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [0, 2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    (root / "summing" / "1").mkdir(parents=True)
    onnx.save(proto, str(root / "summing" / "1" / "model.onnx"))
    (root / "summing" / "config.toml").write_text(SUMMING_CONFIG)
    return root


async def test_steps_of_other_shapes_on_a_dynamic_axis_run_in_batches_of_one_shape(
    tmp_path: Path,
) -> None:
    """Steps whose inputs cannot be stacked (another extent on a dynamic axis that is not
    time) never share a batch: each is served, none fails for another's shape."""
    repository = load_repository(_summing_repository(tmp_path))
    widths = [3, 5, 3, 5, 2]
    async with running_engine(repository) as engine:
        ids = [
            (await engine.open_session("summing", "", "", {}, 0, OWNER)).session_id for _ in widths
        ]
        xs = [
            np.random.default_rng(n).standard_normal((2, f)).astype(np.float32)
            for n, f in enumerate(widths)
        ]
        sink = Collector()
        engine.submit(
            [
                (n, sid, {"x": x}, None, None)
                for n, (sid, x) in enumerate(zip(ids, xs, strict=True))
            ],
            OWNER,
            sink,
        )
        by_ticket = {o.ticket: o for o in await sink.wait_for(len(widths))}
        for n, x in enumerate(xs):
            outcome = by_ticket[n]
            assert outcome.error is None, outcome.error
            assert outcome.position == 2
            got = outcome.outputs["Y"][outcome.row]  # type: ignore[index]
            np.testing.assert_allclose(got.ravel(), [x.sum()], rtol=1e-5)
        (sizes,) = engine.metrics.batch_size.labels("summing", "1").collect()
        counted = {sample.name.rpartition("_")[2]: sample.value for sample in sizes.samples}
        assert (counted["count"], counted["sum"]) == (3, 5)  # widths 3, 5, 2: three batches


async def test_an_input_extent_left_to_the_graph_is_checked_against_the_graph(
    repo_path: Path, tmp_path: Path
) -> None:
    """``shape = [-1, -1, -1]`` for tiny_rnn's x, whose graph fixes 4 features: a step of 3
    is refused INVALID_ARGUMENT alone, in its turn, and the batch it came with is served."""
    import shutil

    shutil.copytree(repo_path / "tiny_rnn", tmp_path / "repo" / "tiny_rnn")
    config = tmp_path / "repo" / "tiny_rnn" / "config.toml"
    config.write_text(config.read_text().replace("shape = [-1, -1, 4]", "shape = [-1, -1, -1]"))
    repository = load_repository(tmp_path / "repo")
    assert repository.get("tiny_rnn").config.inputs[0].shape == [-1, -1, 4]
    async with running_engine(repository) as engine:
        ids = [
            (await engine.open_session("tiny_rnn", "", "", {}, 0, OWNER)).session_id
            for _ in range(3)
        ]
        sink = Collector()
        narrow = np.zeros((1, 3), np.float32)
        engine.submit(
            [
                (0, ids[0], {"x": _x(0)}, None, None),
                (1, ids[1], {"x": narrow}, None, None),
                (2, ids[2], {"x": _x(2)}, b"digest", 7),  # a position mismatch
            ],
            OWNER,
            sink,
        )
        by_ticket = {o.ticket: o for o in await sink.wait_for(3)}
        assert by_ticket[0].error is None and by_ticket[0].position == 1
        refused, mismatch = by_ticket[1].error, by_ticket[2].error
        assert refused is not None and refused.code.name == "INVALID_ARGUMENT"
        assert "axis 1 is 3, model wants 4" in refused.message
        assert mismatch is not None and mismatch.reason == errors.POSITION_MISMATCH
        assert (await engine.get_session(ids[1], OWNER)).position == 0


async def test_a_step_on_the_models_thread_when_the_engine_stops_is_applied_and_answered(
    repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stopping used to cancel the batcher's loop while the run was on the thread: the step's
    # caller never heard, though the thread computed it anyway.
    engine = Engine(load_repository(repo_path), Metrics())
    await engine.start()
    try:
        (sid,) = await _open(engine, 1)
        slow_runs(monkeypatch, engine, "tiny_lstm:2", 0.3)
        sink = Collector()
        engine.submit([(0, sid, {"x": _x(5)}, None, None)], OWNER, sink)
        await asyncio.sleep(0.1)  # the run is on the model's thread
    finally:
        await engine.stop()
    (outcome,) = sink.outcomes
    assert outcome.error is None and outcome.position == 1
    want = run_reference(repo_path, "tiny_lstm", "2", {"x": _x(5)})
    got = outcome.outputs["Y"][outcome.row]  # type: ignore[index]
    np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-5)


async def test_a_long_chunk_runs_on_the_models_thread_and_single_steps_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that takes much longer than a hop to the model's thread (~60 µs) leaves the event
    loop free meanwhile, whatever the core count: the loop goes on reading calls, refusing
    those past a budget and answering health checks. Single steps of the same model stay on
    the loop: the run time expected is learned per batch size *and* timesteps, so a model
    serving both is not mistaken for slow (or fast) by the other's runs."""
    chunk = 65_536  # tiny_lstm: ~17 ms a run on the 2-core CI machine, ~1 µs a step for one
    repo = build_test_repository(tmp_path, {"max_timesteps": chunk, "max_sessions": 4})
    async with running_engine(load_repository(repo)) as engine:
        (sid,) = await _open(engine, 1)
        batcher = engine.batchers["tiny_lstm:2"]
        execute, threads = batcher.execute, []

        def watched(*args: object) -> object:
            threads.append(threading.current_thread())
            return execute(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(batcher, "execute", watched)
        lengths = [chunk, 1, chunk, 1, chunk, 1, 1]
        for n, timesteps in enumerate(lengths):
            sink = Collector()
            engine.submit([(n, sid, {"x": _x(n, timesteps)}, None, None)], OWNER, sink)
            (outcome,) = await sink.wait_for(1)
            assert outcome.error is None
        assert (await engine.get_session(sid, OWNER)).position == sum(lengths)
    loop = threading.current_thread()
    # The first chunk runs where an unknown run does (on the loop) and teaches the batcher.
    assert [thread is loop for thread in threads] == [True, True, False, True, False, True, True]


async def test_a_restart_keeps_when_each_session_was_last_used_and_their_order(
    repo_path: Path, tmp_path: Path
) -> None:
    # Restored sessions used to report the restart as their last use, in snapshot order.
    config = EngineConfig(snapshot_path=tmp_path / "sessions.snap")
    engine = Engine(load_repository(repo_path), Metrics(), config)
    await engine.start()
    ids = await _open(engine, 3)
    for sid in reversed(ids):  # last used: ids[2] first, ids[0] last
        sink = Collector()
        engine.submit([(0, sid, {"x": _x(1)}, None, None)], OWNER, sink)
        await sink.wait_for(1)
        await asyncio.sleep(0.01)
    before = {sid: (await engine.get_session(sid, OWNER)).last_use_time for sid in ids}
    await engine.stop()

    restarted = Engine(load_repository(repo_path), Metrics(), config)
    await restarted.start()
    try:
        after = {sid: (await restarted.get_session(sid, OWNER)).last_use_time for sid in ids}
        assert after == before
        (slabs,) = [s for s in restarted.store._slabs.values() if s.lru]  # noqa: SLF001
        assert [sid for _, sid in slabs.lru] == list(reversed(ids))  # least recent first
    finally:
        await restarted.stop()


async def test_eviction_takes_from_the_caller_or_the_largest_holder_never_the_others(
    tmp_path: Path,
) -> None:
    """on_full = "evict_lru" with several identities: a crowd of one identity's opens evicts
    that identity's own sessions, not everybody else's."""
    repository = build_test_repository(tmp_path, {"max_sessions": 4, "on_full": "evict_lru"})
    async with running_engine(load_repository(repository)) as engine:
        bobs = (await engine.open_session("tiny_rnn", "", "bobs", {}, 0, "bob")).session_id
        alices = [
            (await engine.open_session("tiny_rnn", "", f"alice-{n}", {}, 0, "alice")).session_id
            for n in range(10)
        ]
        assert (await engine.get_session(bobs, "bob")).position == 0  # never evicted
        alive = []
        for sid in alices:
            try:
                await engine.get_session(sid, "alice")
                alive.append(sid)
            except errors.RnnserveError as error:
                assert error.reason == errors.SESSION_EVICTED
        assert alive == alices[-3:]  # alice's newest three share the model with bob's one
        # A newcomer with no session takes from the largest holder (alice), not from bob.
        await engine.open_session("tiny_rnn", "", "carols", {}, 0, "carol")
        assert (await engine.get_session(bobs, "bob")).position == 0


@pytest.mark.parametrize("repeat", [False, True], ids=["distinct", "one-session-twice"])
async def test_more_queued_sessions_than_a_batch_holds_run_in_queue_order(
    tmp_path: Path, repeat: bool
) -> None:
    # A batch holds 4 sessions here; 10 are queued at once, so batches take the queue's head,
    # one step per session, in order; with one session queued twice (`repeat`) its second
    # step waits for a later batch, behind its first.
    repository = build_test_repository(
        tmp_path, {"max_queue_delay_us": 20000, "max_batch_size": 4, "max_sessions": 16}
    )
    async with running_engine(load_repository(repository)) as engine:
        ids = await _open(engine, 10)
        order = [*ids[:3], ids[0], *ids[3:]] if repeat else ids
        sink = Collector()
        engine.submit(
            [(n, sid, {"x": _x(n)}, None, None) for n, sid in enumerate(order)], OWNER, sink
        )
        outcomes = await sink.wait_for(len(order))
        assert all(o.error is None for o in outcomes)
        batches: list[list[int]] = []
        last = None
        for outcome in outcomes:  # one batch's outcomes share its outputs
            if outcome.outputs is not last:
                batches.append([])
                last = outcome.outputs
            batches[-1].append(outcome.ticket)
        if repeat:  # ticket 3 is ids[0]'s second step: not in the batch of its first
            assert batches == [[0, 1, 2, 4], [3, 5, 6, 7], [8, 9, 10]]
        else:
            assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        positions = {sid: 0 for sid in ids}
        state: dict[str, dict[str, np.ndarray]] = {}
        for ticket in sorted(o.ticket for o in outcomes):
            outcome = next(o for o in outcomes if o.ticket == ticket)
            sid = order[ticket]
            positions[sid] += 1
            assert outcome.position == positions[sid]
            want = run_reference(repository, "tiny_lstm", "2", {"x": _x(ticket)}, state.get(sid))
            assert outcome.outputs is not None
            state[sid] = {k: v for k, v in want.items() if k not in outcome.outputs}
            got = outcome.outputs["Y"][outcome.row]
            np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-5)


async def test_a_step_that_may_start_at_once_is_answered_within_the_submitting_call(
    repo_path: Path,
) -> None:
    # An idle engine runs a batch that waiting cannot make larger right in submit (no hop to
    # the batcher's task): a lone session's step, or a crowd's steps submitted together.
    async with running_engine(load_repository(repo_path)) as engine:
        (lone,) = await _open(engine, 1)
        sink = Collector()
        engine.submit([(0, lone, {"x": _x(0)}, None, None)], OWNER, sink)
        assert [(o.ticket, o.position, o.error) for o in sink.outcomes] == [(0, 1, None)]
    async with running_engine(load_repository(repo_path)) as engine:
        crowd = await _open(engine, 3)
        together = Collector()
        engine.submit(
            [(n, sid, {"x": _x(n)}, None, None) for n, sid in enumerate(crowd)], OWNER, together
        )
        assert [o.ticket for o in together.outcomes] == [0, 1, 2]
        assert len({id(o.outputs) for o in together.outcomes}) == 1  # one batch


async def test_a_step_that_waits_for_its_cohort_runs_with_it(repo_path: Path) -> None:
    # Two sessions that stepped together are each other's cohort: the first to step again
    # waits (up to the queue delay) for the second, and their steps run as one batch.
    async with running_engine(load_repository(repo_path)) as engine:
        a, b = await _open(engine, 2)
        first = Collector()
        engine.submit(
            [(0, a, {"x": _x(0)}, None, None), (1, b, {"x": _x(1)}, None, None)], OWNER, first
        )
        await first.wait_for(2)
        second = Collector()
        engine.submit([(2, a, {"x": _x(2)}, None, None)], OWNER, second)
        assert second.outcomes == []  # waiting for b
        engine.submit([(3, b, {"x": _x(3)}, None, None)], OWNER, second)
        outcomes = await second.wait_for(2)
        assert [(o.ticket, o.position) for o in outcomes] == [(2, 2), (3, 2)]
        assert outcomes[0].outputs is outcomes[1].outputs


async def test_a_caller_stepping_again_from_its_sink_is_answered_in_a_later_turn(
    repo_path: Path,
) -> None:
    # A closed-loop caller in the engine's own process submits its next step from the sink
    # that receives the last answer: the batch being answered does not run it recursively;
    # every step is answered once, in order.
    async with running_engine(load_repository(repo_path)) as engine:
        (sid,) = await _open(engine, 1)
        answered: list[tuple[int, int]] = []
        depth = 0
        deepest = 0
        done = asyncio.Event()

        def sink(outcomes: list) -> None:
            nonlocal depth, deepest
            depth += 1
            deepest = max(deepest, depth)
            for outcome in outcomes:
                assert outcome.error is None
                answered.append((outcome.ticket, outcome.position))
                if outcome.ticket < 5:
                    n = outcome.ticket + 1
                    engine.submit([(n, sid, {"x": _x(n)}, None, None)], OWNER, sink)
                else:
                    done.set()
            depth -= 1

        engine.submit([(0, sid, {"x": _x(0)}, None, None)], OWNER, sink)
        await asyncio.wait_for(done.wait(), 10)
        assert answered == [(n, n + 1) for n in range(6)]
        assert deepest == 1


async def test_a_refused_step_of_a_known_session_names_its_model(repo_path: Path) -> None:
    # Position mismatches were answered without it, and counted under model="" in metrics.
    async with running_engine(load_repository(repo_path)) as engine:
        (sid,) = await _open(engine, 1)
        sink = Collector()
        engine.submit([(0, sid, {"x": _x(1)}, b"digest", 5)], OWNER, sink)
        (outcome,) = await sink.wait_for(1)
        assert outcome.error is not None and outcome.error.reason == errors.POSITION_MISMATCH
        assert outcome.model == "tiny_lstm:2"
