"""The engine process's capacity over the pipe, without gRPC: what every frontend shares.

With ``--frontends N`` every step of every frontend passes through the one engine process:
unpickled, checked, batched, run, answered, pickled back. Its CPU per step caps the whole
server however many frontends there are (on a GPU host, where the model's run costs the CPU
little, this is what 8 frontends meet first). Here the engine process runs as the server runs
it (:class:`~rnnserve.server.engine.ipc.EngineServer` on a unix socket, uvloop when installed)
and ``--load-procs`` processes stand in for frontends: each connects an
:class:`~rnnserve.server.frontend.engine_client.EngineClient`, opens its share of the sessions
and keeps one step of each in flight (closed loop, answered by a callback, so a load process
costs little next to a frontend). Reported per session count: steps/s, the engine process's
CPU per step and its share of a core (near 1: the engine is the limit), and the load
processes' CPU per step (the pipe's cost on a frontend's side).

    python -m rnnserve.bench.engine_pipe --sessions 64 256 1024 [--device cuda] [--json FILE]

``--src DIR`` imports ``rnnserve.server`` from another checkout in every process, for A/B
runs in one sitting (as ``engine_cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from typing import Any

OWNER = "bench"


def _use(src: str) -> None:
    if src:
        from rnnserve.bench.engine_cpu import _use_source

        _use_source(Path(src))


def _engine(repository: str, device: str, path: str, ready: Any, src: str) -> None:
    _use(src)
    from rnnserve.bench.ipc import run_on_uvloop
    from rnnserve.server.engine.core import Engine
    from rnnserve.server.engine.ipc import EngineServer
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import load_repository

    async def main() -> None:
        engine = Engine(load_repository(Path(repository), device), Metrics())
        await engine.start()
        server = EngineServer(engine, path)
        await server.start()
        ready.set()
        await asyncio.Event().wait()  # until the parent kills this process

    run_on_uvloop(main)


class _Session:
    """One session's closed loop: its next step leaves as soon as its answer arrives."""

    __slots__ = ("_client", "_sid", "_inputs", "_answered", "failed")

    def __init__(self, client: Any, sid: str, inputs: dict[str, Any], answered: Any) -> None:
        self._client, self._sid, self._inputs, self._answered = client, sid, inputs, answered
        self.failed: object = None

    def step(self) -> None:
        self._client.submit([(0, self._sid, self._inputs, None, None)], OWNER, self)

    def __call__(self, outcomes: list[Any]) -> None:
        for outcome in outcomes:
            if outcome.error is not None:  # a figure with failed steps in it would be wrong
                self.failed = outcome.error
                return
        self._answered.value += len(outcomes)
        self.step()


def _load(path: str, model: str, sessions: int, answered: Any, started: Any, src: str) -> None:
    _use(src)
    from rnnserve.bench.floors import one_timestep
    from rnnserve.bench.ipc import run_on_uvloop
    from rnnserve.server.frontend.engine_client import EngineClient

    async def main() -> None:
        client = EngineClient(path)
        await client.connect()
        inputs = one_timestep(client.catalogue().get(model).config, sessions)
        loops = []
        for _ in range(sessions):
            opened = await client.open_session(model, "", "", {}, 0, OWNER)
            loops.append(_Session(client, opened.session_id, inputs, answered))
        started.set()
        for loop in loops:
            loop.step()
        while True:
            await asyncio.sleep(0.2)
            failed = next((s.failed for s in loops if s.failed is not None), None)
            if failed is not None:
                raise RuntimeError(f"step failed: {failed}")

    run_on_uvloop(main)


def measure(
    sessions: list[int],
    load_procs: int,
    seconds: float,
    repeats: int,
    device: str = "cpu",
    src: str = "",
) -> dict[str, dict[str, float]]:
    """Figures per session count (the median window of ``repeats``)."""
    import psutil
    from rnnserve.bench.model import BATCHED, write_repository

    context = mp.get_context("spawn")
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder) / "models"
        repository.mkdir()
        write_repository(repository)
        path = str(Path(folder) / "engine.sock")
        ready = context.Event()
        engine = context.Process(
            target=_engine, args=(str(repository), device, path, ready, src), daemon=True
        )
        engine.start()
        try:
            if not ready.wait(120):
                raise RuntimeError("the engine process did not start")
            for count in sessions:
                out[str(count)] = _measure_one(
                    context, psutil.Process(engine.pid), path, BATCHED, count, load_procs,
                    seconds, repeats, src,
                )  # fmt: skip
        finally:
            engine.kill()
            engine.join()
    return out


def _measure_one(
    context: Any,
    engine: Any,
    path: str,
    model: str,
    sessions: int,
    load_procs: int,
    seconds: float,
    repeats: int,
    src: str,
) -> dict[str, float]:
    import psutil

    shares = [sessions // load_procs + (i < sessions % load_procs) for i in range(load_procs)]
    counters = [context.Value("q", 0, lock=False) for _ in shares]
    started = [context.Event() for _ in shares]
    procs = [
        context.Process(target=_load, args=(path, model, n, c, s, src), daemon=True)
        for n, c, s in zip(shares, counters, started, strict=True)
    ]
    for proc in procs:
        proc.start()
    try:
        for event in started:
            if not event.wait(120):
                raise RuntimeError("a load process did not start")
        loads = [psutil.Process(proc.pid) for proc in procs]
        time.sleep(1.0)  # warm up: batches settle, caches fill

        def cpu(process: Any) -> float:
            times = process.cpu_times()
            return float(times.user + times.system)

        windows = []
        for _ in range(repeats):
            steps0 = sum(c.value for c in counters)
            engine0, load0 = cpu(engine), sum(cpu(p) for p in loads)
            wall0 = time.perf_counter()
            time.sleep(seconds)
            wall = time.perf_counter() - wall0
            steps = sum(c.value for c in counters) - steps0
            if steps <= 0 or not all(proc.is_alive() for proc in procs):
                raise RuntimeError("steps stopped (a load process failed)")
            engine_s = cpu(engine) - engine0
            windows.append(
                {
                    "steps_per_s": steps / wall,
                    "engine_cpu_us_per_step": engine_s / steps * 1e6,
                    "engine_busy": engine_s / wall,
                    "load_cpu_us_per_step": (sum(cpu(p) for p in loads) - load0) / steps * 1e6,
                }
            )
        windows.sort(key=lambda w: w["steps_per_s"])
        return windows[len(windows) // 2]
    finally:
        for proc in procs:
            proc.kill()
            proc.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--load-procs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="the engine's --device (cpu, cuda)")
    parser.add_argument("--src", default="", help="import rnnserve.server from this checkout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    figures = measure(
        args.sessions, args.load_procs, args.seconds, args.repeats, args.device, args.src
    )
    print("sessions  steps/s  engine CPU µs/step  engine busy  load CPU µs/step")
    for count, f in figures.items():
        print(
            f"{count:>8}  {f['steps_per_s']:7.0f}  {f['engine_cpu_us_per_step']:18.2f}"
            f"  {f['engine_busy']:11.2f}  {f['load_cpu_us_per_step']:16.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
