"""Scale-out figures: parking cost, sessions a Redis holds, steps/s when sessions outnumber
slots ten to one, against all sessions resident, in one run on this machine.

- park / unpark latency: one session at a time through the server's own parking code
  (:class:`rnnserve.server.engine.residency.Parking` on a real ``redis-server``), p50 and p99;
- sessions held: that many sessions parked at once, and Redis's memory per session;
- steps/s: two real servers over the same models and the same Redis, one with slots for
  every session and one with a tenth of that, stepped round-robin by the same client load
  (the crowded one parks and unparks a session on nearly every step).

Run: ``.venv/bin/python tests/scaleout/bench.py --out benchmarks/results/scaleout-DATE``
(writes ``.json`` and ``.md``); ``tests/scaleout/test_bench.py`` runs a small one (slow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "scaleout"  # noqa: A001

from deploy.stubs import to_tensor
from deploy.tools import free_port
from rnnserve.testing import ServerProcess, build_test_repository
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import MODEL, SESSION_HEADER


def _quantiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1e3
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "n": len(samples),
    }


async def _engine(repository: Path, url: str, prefix: str) -> Any:
    """An engine on ``repository`` parking in the store at ``url`` (no reaper of its own:
    the benchmark parks when it says)."""
    from rnnserve.server.engine.core import Engine, EngineConfig
    from rnnserve.server.engine.state_store import RedisStateStore
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import load_repository

    config = EngineConfig(reap_interval_s=3600, park_after_s=3600)
    engine = Engine(load_repository(repository), Metrics(), config, RedisStateStore(url, prefix))
    await engine.start()
    return engine


async def _stop(engine: Any) -> None:
    await engine.stop()
    await engine.state_store.close()


async def park_unpark_latency(repository: Path, url: str, sessions: int) -> dict[str, Any]:
    """Park then unpark ``sessions`` sessions one by one with the server's parking code
    (an in-process engine on a real ``redis-server``); an unpark is the session's next
    lookup, which takes it back."""
    engine = await _engine(repository, url, "bench-latency:")
    parks: list[float] = []
    unparks: list[float] = []
    try:
        room = engine.repository.get(MODEL, "").config.limits.max_sessions
        for first in range(0, sessions, room):
            ids = [f"lat-{i}" for i in range(first, min(sessions, first + room))]
            for session_id in ids:
                await engine.open_session(MODEL, "", session_id, {}, 0, "anonymous")
            for session_id in ids:
                session = engine.store.resident(session_id, "anonymous")
                started = time.perf_counter()
                assert await engine.residency._park([session], "idle")  # noqa: SLF001
                parks.append(time.perf_counter() - started)
                assert engine.store.resident(session_id, "anonymous") is None
            for session_id in ids:
                started = time.perf_counter()
                await engine.get_session(session_id, "anonymous")
                unparks.append(time.perf_counter() - started)
                assert engine.store.resident(session_id, "anonymous") is not None
            for session_id in ids:
                await engine.close_session(session_id, "anonymous")
    finally:
        await _stop(engine)
    return {"park": _quantiles(parks), "unpark": _quantiles(unparks)}


async def sessions_held(repository: Path, redis: RedisServer, sessions: int) -> dict[str, Any]:
    """Park ``sessions`` sessions at once (a slab's worth a round) and read Redis's memory."""
    client = redis.client()
    before = int(client.info("memory")["used_memory"])
    engine = await _engine(repository, redis.url, "bench-held:")
    parked = 0
    started = time.perf_counter()
    try:
        batch = engine.repository.get(MODEL, "").config.limits.max_sessions
        while parked < sessions:
            for i in range(min(batch, sessions - parked)):
                await engine.open_session(MODEL, "", f"held-{parked + i}", {}, 0, "anonymous")
            parked += await engine.residency.park_all()
    finally:
        await _stop(engine)
    seconds = time.perf_counter() - started
    held = sum(1 for key in client.scan_iter("bench-held:*") if b"#" not in key)
    after = int(client.info("memory")["used_memory"])
    client.flushdb()
    return {
        "sessions_parked": held,
        "seconds": round(seconds, 2),
        "parks_per_s": round(held / seconds),
        "redis_bytes_per_session": round((after - before) / max(held, 1)),
    }


async def _load(address: str, ids: list[str], rounds: int, concurrency: int) -> float:
    """Steps/s of ``rounds`` round-robin passes over ``ids`` with ``concurrency`` in flight."""
    x = to_tensor(np.ones((1, 4), np.float32))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for session_id in ids:
            await stub.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id=session_id))
        queue: asyncio.Queue[str] = asyncio.Queue()
        for _ in range(rounds):
            for session_id in ids:
                queue.put_nowait(session_id)
        busy: set[str] = set()

        async def worker() -> None:
            while not queue.empty():
                session_id = queue.get_nowait()
                if session_id in busy:  # one step per session at a time, keep the order
                    queue.put_nowait(session_id)
                    await asyncio.sleep(0)
                    continue
                busy.add(session_id)
                request = pb.StepRequest(session_id=session_id, inputs={"x": x})
                await stub.Step(request, metadata=((SESSION_HEADER, session_id),), timeout=60)
                busy.discard(session_id)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(ids) * rounds / (time.perf_counter() - started)


async def steps_per_second(
    root: Path, redis: RedisServer, slots: int, rounds: int, concurrency: int
) -> dict[str, Any]:
    """Ten times ``slots`` sessions stepped on a server with room for all, then on one with
    ``slots`` slots that parks in Redis."""
    sessions = 10 * slots
    results: dict[str, Any] = {"slots": slots, "sessions": sessions, "concurrency": concurrency}
    for label, room in (("all_resident", sessions), ("parking_10x", slots)):
        repository = build_test_repository(
            root / label, {"max_queue_delay_us": 500, "max_sessions": room}
        )
        args = ("--state-store", redis.url, "--state-store-prefix", f"bench-{label}:")
        with ServerProcess(repository, *args, "--log-level", "WARNING") as server:
            ids = [f"{label}-{i}" for i in range(sessions)]
            results[f"{label}_steps_per_s"] = round(
                await _load(server.address, ids, rounds, concurrency)
            )
    results["ratio_parking_to_resident"] = round(
        results["parking_10x_steps_per_s"] / results["all_resident_steps_per_s"], 3
    )
    return results


async def run(
    out: Path | None, *, latency_n: int, held_n: int, slots: int, rounds: int, concurrency: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rnnserve-scaleout-bench-") as tmp:
        root = Path(tmp)
        repository = build_test_repository(root / "repository")
        with RedisServer(root / "redis", free_port()) as redis:
            report = {
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": __import__("os").cpu_count(),
                "redis": redis.client().info("server")["redis_version"],
                "model": MODEL,
                "latency": await park_unpark_latency(repository, redis.url, latency_n),
                "held": await sessions_held(repository, redis, held_n),
                "throughput": await steps_per_second(root, redis, slots, rounds, concurrency),
            }
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(_markdown(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    lat, held, tput = report["latency"], report["held"], report["throughput"]
    return "\n".join(
        [
            "# Scale-out: parking sessions in Redis",
            "",
            f"Machine: {report['cpus']} CPUs ({report['machine']}), Redis {report['redis']}, "
            f"model {report['model']} (LSTM, hidden 8), loopback, one run "
            "(`tests/scaleout/bench.py`).",
            "",
            "| figure | value |",
            "| --- | --- |",
            f"| park, one session (p50 / p99) | {lat['park']['p50_ms']} / "
            f"{lat['park']['p99_ms']} ms (n={lat['park']['n']}) |",
            f"| unpark, one session (p50 / p99) | {lat['unpark']['p50_ms']} / "
            f"{lat['unpark']['p99_ms']} ms (n={lat['unpark']['n']}) |",
            f"| sessions parked at once | {held['sessions_parked']:,} "
            f"({held['parks_per_s']:,}/s, {held['redis_bytes_per_session']} B of Redis each) |",
            f"| steps/s, {tput['sessions']} sessions, all resident | "
            f"{tput['all_resident_steps_per_s']:,} |",
            f"| steps/s, {tput['sessions']} sessions on {tput['slots']} slots (parking) | "
            f"{tput['parking_10x_steps_per_s']:,} |",
            f"| ratio parking / resident | {tput['ratio_parking_to_resident']} |",
            "",
            f"Load: {tput['concurrency']} unary steps in flight, round-robin over the sessions, "
            "so with 10x sessions nearly every step first parks one session and unparks "
            "another: the worst case, not a typical mix.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results path, no suffix")
    parser.add_argument("--latency-n", type=int, default=2000)
    parser.add_argument("--held-n", type=int, default=100_000)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    report = asyncio.run(
        run(
            args.out,
            latency_n=args.latency_n,
            held_n=args.held_n,
            slots=args.slots,
            rounds=args.rounds,
            concurrency=args.concurrency,
        )
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
