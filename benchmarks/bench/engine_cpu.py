"""The engine's own cost per step, in CPU time, against onnxruntime alone.

Builds the benchmark LSTM (``rnnserve.bench.model``), starts an in-process
:class:`~rnnserve.server.engine.core.Engine` on the CPU, opens B sessions and submits one
step for each of them, round after round (what ``floors.engine_floor`` does); beside it,
onnxruntime alone runs the same batch (``session.run`` on the stacked inputs and states, one
intra-op thread). Time is ``time.process_time()`` (CPU time of the process), not wall time,
so that other work on a busy machine counts less; each figure is the minimum over
``--repeats`` windows of ``--seconds`` each, the engine and onnxruntime windows interleaved.

    python -m rnnserve.bench.engine_cpu --batches 64 256

prints, per batch, CPU µs per step for the engine and for onnxruntime, the engine's own
µs per step (the difference) and engine/onnxruntime as a throughput ratio (1.0 = the engine
costs nothing beyond onnxruntime). ``--json FILE`` writes the figures too.

``--python-only`` replaces the model's run by outputs recorded once per batch size, so the
engine's own figure is its Python and numpy alone (checks, queue, gather, scatter, replies),
without onnxruntime's run and the caches that run evicts: the least noisy A/B measure. The
engine column is then that figure plus onnxruntime alone's, the ratio what it would be if
the two added up exactly (in a real run they add up to a little more).

``--evict-mb N`` (with ``--python-only``) reads N MiB of other memory in place of each run,
as the run's weights do, and leaves that reading out of the engine's figure: what the same
Python costs once its data and code are out of the caches (``--evict-mb 4`` on a 2 MiB-L2
machine brings the replayed engine to within a few percent of the real run's figure).

To compare two checkouts (A/B in one sitting), run the same command with each checkout's
code on ``sys.path`` first: ``--src DIR`` imports ``rnnserve.server`` from ``DIR/server``
(e.g. a ``git worktree`` of the base commit), alternating runs several times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path


def _use_source(src: Path) -> None:
    """Import ``rnnserve.server`` from another checkout (``src/server``)."""
    shim = Path(tempfile.mkdtemp(prefix="rnnserve-src-")) / "rnnserve"
    shim.mkdir()
    (shim / "server").symlink_to(src.resolve() / "server")
    sys.path.insert(0, str(shim.parent))


def measure(
    batches: list[int],
    repeats: int,
    seconds: float,
    python_only: bool = False,
    evict_mb: float = 0.0,
) -> dict[str, dict[str, float]]:
    import numpy as np
    import onnxruntime as ort
    from rnnserve.bench.floors import EngineRound
    from rnnserve.bench.model import BATCHED, write_repository
    from rnnserve.server.engine.core import Engine
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import load_repository

    async def run(folder: Path) -> dict[str, dict[str, float]]:
        repository = load_repository(folder, "cpu")
        engine = Engine(repository, Metrics())
        await engine.start()
        mv = repository.get(BATCHED)
        config = mv.config
        evicting = np.ones(int(evict_mb * 2**20) // 8)
        evicted = [0.0]  # CPU seconds spent reading ``evicting``, left out of the figures
        if python_only:
            recorded: dict[int, list] = {}
            real_run = mv.runner.run

            def replay(names: list[str], feeds: dict) -> list:
                n = feeds["x"].shape[1]
                if n not in recorded:
                    recorded[n] = real_run(names, feeds)
                if evicting.size:
                    started = time.process_time()
                    evicting.sum()
                    evicted[0] += time.process_time() - started
                return recorded[n]

            mv.runner.run = replay
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        alone = ort.InferenceSession(
            str(folder / BATCHED / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        out: dict[str, dict[str, float]] = {}
        try:
            for batch in batches:
                ids = [
                    (await engine.open_session(BATCHED, "", "", {}, 0, "bench")).session_id
                    for _ in range(batch)
                ]
                rng = np.random.default_rng(batch)
                x = rng.standard_normal((1, 32)).astype(np.float32)
                steps = [(n, sid, {"x": x}, None, None) for n, sid in enumerate(ids)]
                engine_round = EngineRound(engine, steps).run

                feeds = {"x": np.stack([x] * batch, 1)}
                for state in config.states:
                    shape = list(state.session_shape)
                    shape.insert(state.batch_axis, batch)
                    feeds[state.input] = np.zeros(shape, np.float32)

                async def ort_round(feeds: dict = feeds) -> None:
                    alone.run(None, feeds)

                async def window(one_round, batch: int = batch) -> float:  # noqa: ANN001
                    for _ in range(3):
                        await one_round()
                    rounds = 0
                    evicted[0] = 0.0
                    wall, cpu = time.perf_counter(), time.process_time()
                    while time.perf_counter() - wall < seconds:
                        await one_round()
                        rounds += 1
                    return (time.process_time() - cpu - evicted[0]) / (rounds * batch)

                engine_s, ort_s = [], []
                for _ in range(repeats):
                    engine_s.append(await window(engine_round))
                    ort_s.append(await window(ort_round))
                e, o = min(engine_s), min(ort_s)
                if python_only:  # e is the engine's own time; what running would add is o
                    e += o
                out[str(batch)] = {
                    "engine_us_per_step": e * 1e6,
                    "ort_us_per_step": o * 1e6,
                    "engine_own_us_per_step": (e - o) * 1e6,
                    "engine_over_ort": o / e,
                }
                await engine.close_sessions(ids, "bench")
        finally:
            await engine.stop()
            repository.close()
        return out

    with tempfile.TemporaryDirectory() as folder:
        write_repository(Path(folder))
        return asyncio.run(run(Path(folder)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--src", type=Path, help="import rnnserve.server from this checkout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--python-only", action="store_true", help="replay recorded outputs instead of running"
    )
    parser.add_argument(
        "--evict-mb",
        type=float,
        default=0.0,
        help="with --python-only: read this many MiB in place of each run (not counted)",
    )
    args = parser.parse_args(argv)
    if args.evict_mb and not args.python_only:
        parser.error("--evict-mb needs --python-only")
    if args.src is not None:
        _use_source(args.src)
    import rnnserve.server

    figures = measure(args.batches, args.repeats, args.seconds, args.python_only, args.evict_mb)
    print(f"rnnserve.server from {Path(rnnserve.server.__file__).parent}")
    if args.python_only:
        print("--python-only: engine = its own time (measured without the run) + ort alone")
        if args.evict_mb:
            print(f"--evict-mb {args.evict_mb:g}: {args.evict_mb:g} MiB read in place of each run")
    print("batch  engine µs/step  ort µs/step  engine own µs/step  engine/ort")
    for batch, f in figures.items():
        print(
            f"{batch:>5}  {f['engine_us_per_step']:14.2f}  {f['ort_us_per_step']:11.2f}"
            f"  {f['engine_own_us_per_step']:18.2f}  {f['engine_over_ort']:10.3f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
