"""One batch's run path, measured alone: gather the state rows, run, scatter the new state.

Compares, on the benchmark LSTM (``rnnserve.bench.model``) at each batch size:

- ``session_run``: numpy slabs, rows stacked, ``session.run`` (the path before IOBinding);
- ``iobinding_host``: the server's path with host slabs (numpy gather/scatter, IOBinding run);
- ``iobinding_device``: the server's path with device slabs (OrtValue slabs gathered and
  scattered by onnxruntime on the session's device; on CUDA, state never leaves the device).

Rounds of the three are interleaved so a busy machine slows all alike; the figure is the
median over rounds of the mean time per batch. ``python -m rnnserve.bench.runpath --help``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rnnserve.bench.model import BATCHED, write_repository
from rnnserve.server.engine.slabs import DeviceSlabs, HostSlabs
from rnnserve.server.repository import load_repository


def measure(
    device: str,
    batches: list[int],
    rounds: int,
    seconds_per_round: float,
    peephole: bool = False,
    tf32: bool = False,
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as folder:
        write_repository(Path(folder), peephole=peephole)
        repository = load_repository(Path(folder), device, tf32)
        try:
            mv = repository.get(BATCHED)
            doc = _measure(mv, batches, rounds, seconds_per_round)
            if peephole:
                doc["model"] = f"{mv.key}: 2-layer peephole LSTM, input 32, hidden 256, T=1"
            doc["placement"] = mv.runner.placement
            doc["tf32"] = tf32
            return doc
        finally:
            repository.close()


def _measure(mv, batches: list[int], rounds: int, seconds: float) -> dict[str, object]:  # noqa: ANN001
    runner = mv.runner
    config = mv.config
    n_slots = config.limits.max_sessions
    states = config.states
    client_outputs = [o.name for o in config.outputs]
    state_outputs = [s.output for s in states]
    plain = runner.session  # the same session, run the plain way
    host = HostSlabs(config, n_slots)
    on_device = DeviceSlabs(config, n_slots, runner.device, runner.providers)
    rng = np.random.default_rng(0)
    for slot in range(n_slots):
        row = {s.input: rng.standard_normal(s.session_shape).astype(np.float32) for s in states}
        host.write(slot, row)
    numpy_slabs = {name: slab.copy() for name, slab in host.arrays.items()}
    for slot in range(n_slots):
        on_device.write(slot, host.read(slot))

    def session_run(slots: np.ndarray, x: np.ndarray) -> None:
        feeds = {"x": x}
        for s in states:
            rows = numpy_slabs[s.input][slots]
            feeds[s.input] = np.ascontiguousarray(np.moveaxis(rows, 0, s.batch_axis))
        values = plain.run(client_outputs + state_outputs, feeds)
        for s, value in zip(states, values[len(client_outputs) :], strict=True):
            numpy_slabs[s.input][slots] = np.moveaxis(value, s.batch_axis, 0)

    def bound(memory: HostSlabs | DeviceSlabs) -> Callable[[np.ndarray, np.ndarray], None]:
        def step(slots: np.ndarray, x: np.ndarray) -> None:
            _, new = runner.run_bound({"x": x}, memory.gather(slots), client_outputs, state_outputs)
            memory.scatter(slots, None, {s.input: v for s, v in zip(states, new, strict=True)})

        return step

    paths = {
        "session_run": session_run,
        "iobinding_host": bound(host),
        "iobinding_device": bound(on_device),
    }
    result: dict[str, dict[str, dict[str, float]]] = {name: {} for name in paths}
    for batch in batches:
        slots = rng.choice(n_slots, batch, replace=False).astype(np.intp)
        x = rng.standard_normal((1, batch, 32)).astype(np.float32)
        per_round: dict[str, list[float]] = {name: [] for name in paths}
        for path in paths.values():
            for _ in range(3):
                path(slots, x)
        for _ in range(rounds):
            for name, path in paths.items():
                runs, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    path(slots, x)
                    runs += 1
                per_round[name].append((time.perf_counter() - start) / runs)
        for name, times in per_round.items():
            median = statistics.median(times)
            result[name][str(batch)] = {
                "batch_us_median": round(median * 1e6, 1),
                "batch_us_min": round(min(times) * 1e6, 1),
                "steps_per_s": round(batch / median, 1),
            }
    state_bytes = sum(host.arrays[s.input][0].nbytes for s in states)
    crossing = 2 * state_bytes if runner.device != "cpu" else 0  # in and out, per step
    return {
        "model": f"{mv.key}: 2-layer LSTM, input 32, hidden 256, T=1",
        # State bytes copied between host and device per step, by path (0 on CPU: no bus).
        "state_bytes_host_device_per_step": {
            "session_run": crossing,
            "iobinding_host": crossing,
            "iobinding_device": 0,
        },
        "device": runner.device,
        "providers": runner.providers,
        "onnxruntime": ort.__version__,
        "machine": platform.node(),
        "rounds": rounds,
        "seconds_per_round": seconds,
        "paths": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds-per-round", type=float, default=0.5)
    parser.add_argument("--peephole", action="store_true", help="The LSTM with peepholes.")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA.")
    parser.add_argument("--out", type=Path, default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    doc = measure(
        args.device, args.batches, args.rounds, args.seconds_per_round, args.peephole, args.tf32
    )
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
