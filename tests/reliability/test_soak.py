"""Soak: many sessions stepping at once, with opens, closes, forks and exports mixed in.

Every output is checked against onnxruntime run directly on the same model (all of one
lane's steps in one call), so any cross-talk between sessions shows as a wrong number.
A session is a *lane*: its inputs are fixed by (lane, step); a lane survives being closed
and reopened from its exported state, and its forks must answer like the lane itself.

Default: 100 sessions x 100 steps. ``--runslow`` or ``RNNSERVE_SOAK=full``: 1,000 x 1,000,
and the results are written to ``tests/reliability/SOAK_RESULTS.md``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from rnnserve.v1 import inference_service_pb2 as pb

from .harness import (
    HIDDEN_SIZE,
    INPUT_SIZE,
    MODEL,
    ServerProcess,
    build_repository,
    inputs_for,
    step_request,
    stub,
    to_array,
)

STREAMS = 8
EVERY = 10  # every EVERY rounds, a few lanes are exported, forked, or closed and reopened
RESULTS = Path(__file__).with_name("SOAK_RESULTS.md")


@dataclass
class Lane:
    """One logical session; its server session id changes when it is closed and reopened."""

    index: int
    session_id: str
    position: int = 0
    outputs: list[np.ndarray] = field(default_factory=list)
    fork_outputs: list[tuple[int, np.ndarray]] = field(default_factory=list)
    final_h: np.ndarray | None = None


def _full(config: pytest.Config) -> bool:
    return bool(config.getoption("--runslow")) or os.environ.get("RNNSERVE_SOAK") == "full"


def _reference(model: Path, sessions: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Every lane's outputs (steps, sessions, H) and final states, from onnxruntime directly."""
    runner = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.stack(
        [np.concatenate([inputs_for(i, s) for s in range(steps)]) for i in range(sessions)], 1
    )
    zeros = np.zeros((1, sessions, HIDDEN_SIZE), np.float32)
    y, y_h, _ = runner.run(None, {"X": x, "initial_h": zeros, "initial_c": zeros})
    return y[:, 0], y_h[0]  # (steps, sessions, H), (sessions, H)


async def _stream_lanes(
    channel: grpc.aio.Channel, lanes: list[Lane], rounds: range, latencies: list[float]
) -> None:
    """Step ``lanes`` together on one stream, one coalesced message per round."""
    service = stub(channel)
    call = service.StreamSteps()
    try:
        for step in rounds:
            message = pb.StreamStepsRequest(
                steps=[
                    step_request(
                        lane.session_id,
                        inputs_for(lane.index, step),
                        expected_position=step,
                        request_id=str(lane.index),
                    )
                    for lane in lanes
                ]
            )
            started = time.perf_counter()
            await call.write(message)
            pending = {str(lane.index): lane for lane in lanes}
            while pending:
                reply = await call.read()
                assert reply is not grpc.aio.EOF
                for result in reply.results:
                    assert result.WhichOneof("outcome") == "response", result
                    lane = pending.pop(result.request_id)
                    assert result.session_id == lane.session_id
                    assert result.response.position == step + 1
                    lane.outputs.append(to_array(result.response.outputs["Y"])[0, 0])
            latencies.append(time.perf_counter() - started)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    finally:
        call.cancel()


async def _churn(channel: grpc.aio.Channel, lanes: list[Lane], round_: int, stats: dict) -> None:
    """Export, fork and close/reopen a few lanes (each kind on different lanes)."""
    service = stub(channel)
    count = len(lanes)
    for offset, kind in enumerate(("export", "fork", "reopen")):
        lane = lanes[(round_ * 7 + offset * (count // 3 + 1)) % count]
        exported = await service.ExportState(pb.ExportStateRequest(session_id=lane.session_id))
        assert exported.session.position == lane.position
        stats["exports"] += 1
        if kind == "fork":
            fork_id = f"{lane.session_id}.fork{round_}"
            await service.ForkSession(
                pb.ForkSessionRequest(session_id=lane.session_id, new_session_id=fork_id)
            )
            x = inputs_for(lane.index, lane.position)
            twin = await service.Step(step_request(fork_id, x, expected_position=lane.position))
            lane.fork_outputs.append((lane.position, to_array(twin.outputs["Y"])[0, 0]))
            await service.CloseSession(pb.CloseSessionRequest(session_id=fork_id))
            stats["forks"] += 1
        elif kind == "reopen":
            await service.CloseSession(pb.CloseSessionRequest(session_id=lane.session_id))
            lane.session_id = f"lane{lane.index}.r{round_}"
            await service.OpenSession(
                pb.OpenSessionRequest(
                    model=MODEL,
                    session_id=lane.session_id,
                    initial_state=dict(exported.state),
                    initial_position=lane.position,
                )
            )
            stats["closes"] += 1
            stats["opens"] += 1


async def _soak(server: ServerProcess, sessions: int, steps: int) -> dict:
    process = psutil.Process(server.process.pid)  # type: ignore[union-attr]
    lanes = [Lane(i, f"lane{i}") for i in range(sessions)]
    stats = {"opens": 0, "closes": 0, "forks": 0, "exports": 0}
    latencies: list[float] = []
    rss: list[int] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        service = stub(channel)
        for lane in lanes:
            await service.OpenSession(
                pb.OpenSessionRequest(model=MODEL, session_id=lane.session_id)
            )
            stats["opens"] += 1
        groups = [lanes[g::STREAMS] for g in range(STREAMS)]
        warm_up = max(EVERY, steps // 10)
        for start in range(0, steps, EVERY):
            rounds = range(start, min(steps, start + EVERY))
            await asyncio.gather(*(_stream_lanes(channel, g, rounds, latencies) for g in groups))
            for lane in lanes:
                lane.position = rounds.stop
            if start + EVERY >= warm_up:
                rss.append(process.memory_info().rss)
            if rounds.stop < steps:
                await _churn(channel, lanes, start // EVERY, stats)
        for lane in lanes:
            final = await service.ExportState(pb.ExportStateRequest(session_id=lane.session_id))
            lane.final_h = to_array(final.state["initial_h"])[0]
            await service.CloseSession(pb.CloseSessionRequest(session_id=lane.session_id))
            stats["closes"] += 1
    ordered = sorted(latencies)
    return {
        "lanes": lanes,
        "stats": stats,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "rounds_timed": len(ordered),
        "rss_after_warmup": rss[0],
        "rss_end": rss[-1],
    }


async def test_soak(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    full = _full(request.config)
    sessions, steps = (1000, 1000) if full else (100, 100)
    repository = build_repository(tmp_path / "repository", max_sessions=sessions + 64)
    server = ServerProcess(
        repository, "--max-message-bytes", str(8 << 20), log_path=tmp_path / "server.log"
    ).start()
    started = time.monotonic()
    try:
        result = await _soak(server, sessions, steps)
        assert server.process is not None and server.process.poll() is None
        active = server.metric("rnnserve_active_sessions", model=MODEL)
    finally:
        server.stop()
    elapsed = time.monotonic() - started
    want_y, want_h = _reference(repository / MODEL / "1" / "model.onnx", sessions, steps)
    for lane in result["lanes"]:
        got = np.stack(lane.outputs)
        np.testing.assert_allclose(got, want_y[:, lane.index], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lane.final_h, want_h[lane.index], rtol=1e-5, atol=1e-6)
        for position, twin in lane.fork_outputs:
            np.testing.assert_array_equal(twin, lane.outputs[position])
    assert active == 0
    growth = result["rss_end"] / result["rss_after_warmup"] - 1
    assert growth < 0.05, f"server RSS grew {growth:.1%} after warm-up"
    summary = (
        f"{sessions} sessions x {steps} steps ({sessions * steps} steps) in {elapsed:.1f} s; "
        f"{result['stats']}; 0 errors; 0 cross-talk; stream round latency p50 "
        f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms "
        f"({sessions // STREAMS} sessions per round, {STREAMS} streams); RSS after warm-up "
        f"{result['rss_after_warmup'] / 2**20:.1f} MiB, end {result['rss_end'] / 2**20:.1f} MiB "
        f"({growth:+.2%})"
    )
    print(summary)
    if full:
        # This run owns the top of the file; the sections below it (## ...) are other
        # soaks' (test_soak_topologies.py) and stay.
        others = ""
        if RESULTS.exists():
            text = RESULTS.read_text()
            at = text.find("\n## ")
            others = text[at:] if at >= 0 else ""
        RESULTS.write_text(
            "# Soak results (last full run)\n\n"
            f"Run: `RNNSERVE_SOAK=full pytest tests/reliability/test_soak.py -s` on "
            f"{os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
            f"\n\n{summary}\n{others}"
        )


async def test_over_capacity_sheds_load(tmp_path: Path) -> None:
    """At capacity, opens get RESOURCE_EXHAUSTED at once; a flood is answered, not queued."""
    repository = build_repository(tmp_path / "repository", max_sessions=8)
    server = ServerProcess(repository, log_path=tmp_path / "server.log").start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            service = stub(channel)
            for i in range(8):
                await service.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=f"c{i}"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.OpenSession(pb.OpenSessionRequest(model=MODEL))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A flood of steps on every session: each is applied or refused, never lost.
            x = np.zeros((1, INPUT_SIZE), np.float32)
            calls = [service.Step(step_request(f"c{i % 8}", x)) for i in range(2000)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            codes = [
                grpc.StatusCode.OK if not isinstance(o, BaseException) else o.code()  # type: ignore[union-attr]
                for o in outcomes
            ]
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(
                codes
            )
            applied = 0
            for i in range(8):
                reply = await service.GetSession(pb.GetSessionRequest(session_id=f"c{i}"))
                applied += reply.session.position
            assert applied == codes.count(grpc.StatusCode.OK)
            print(
                f"flood of 2000 steps: {codes.count(grpc.StatusCode.OK)} applied, "
                f"{codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)} shed"
            )
    finally:
        server.stop()
