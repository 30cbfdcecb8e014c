"""The model floor: onnxruntime alone running the served model, with no server around it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def _providers(device: str = "auto", tf32: bool = False) -> list:
    """The providers the server itself would choose (``--device``, ``--tf32``), so both run
    alike."""
    from rnnserve.server.runtime import choose_device, ort_providers

    return ort_providers(choose_device(device).providers, tf32)


def model_floor(
    model_path: Path,
    feeds_for: Callable[[int, int], dict[str, np.ndarray]],
    batches: tuple[int, ...],
    duration_s: float = 1.0,
    intra_op_threads: int = 1,
    timesteps: int = 1,
    device: str = "auto",
    state_inputs: tuple[str, ...] = (),
    tf32: bool = False,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Time one run of ``timesteps`` at each batch size: per-batch run time and steps/s.

    ``feeds_for(batch, timesteps)`` builds the graph feeds. On CUDA the run goes through
    IOBinding with ``state_inputs`` bound from device memory and the graph's other outputs
    than the first left on the device (what the server's device slabs do); inputs and the
    first output cross the bus once per run.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # as the server runs it
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=_providers(device, tf32))
    on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        feeds = feeds_for(batch, timesteps)
        run = _bound_run(session, feeds, state_inputs) if on_cuda else None
        for _ in range(5):
            run() if run else session.run(None, feeds)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            run() if run else session.run(None, feeds)
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        out[str(batch)] = {"step_s": per_run, "steps_per_s": batch / per_run}
    return out, session.get_providers()


def _bound_run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], state_inputs: tuple[str, ...]
) -> Callable[[], None]:
    """One IOBinding run on CUDA: state inputs resident on the device, host inputs copied in,
    the first output back to the host, the other (state) outputs left on the device."""
    resident = {
        name: ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
        for name, value in feeds.items()
        if name in state_inputs
    }
    outputs = [o.name for o in session.get_outputs()]

    def run() -> None:
        binding = session.io_binding()
        for name, value in feeds.items():
            if name in resident:
                binding.bind_ortvalue_input(name, resident[name])
            else:
                binding.bind_cpu_input(name, value)
        binding.bind_output(outputs[0], "cpu")
        for name in outputs[1:]:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        binding.get_outputs()[0].numpy()

    return run


def one_timestep(config: Any, seed: int) -> dict[str, np.ndarray]:
    """Random inputs of one timestep for one session of a model (by its config's inputs)."""
    rng = np.random.default_rng(seed)
    return {
        spec.name: rng.standard_normal(
            [1 if axis == spec.session_time_axis else extent
             for axis, extent in enumerate(spec.session_shape)]
        ).astype(spec.dtype)
        for spec in config.inputs
    }  # fmt: skip


def engine_floor(
    repository: Path,
    model: str,
    batches: tuple[int, ...],
    duration_s: float = 1.0,
    device: str = "auto",
    tf32: bool = False,
) -> dict[str, dict[str, float]]:
    """The engine alone, fed in-process: ``batch`` sessions each submit one step, the engine
    batches, runs and answers them; repeated for ``duration_s``. No gRPC, no protobuf: what
    the engine itself costs on top of onnxruntime (sessions, checks, gather, scatter, replies).
    """
    import asyncio

    from rnnserve.server.engine.core import Engine
    from rnnserve.server.metrics import Metrics
    from rnnserve.server.repository import load_repository

    async def measure() -> dict[str, dict[str, float]]:
        engine = Engine(load_repository(repository, device, tf32), Metrics())
        await engine.start()
        out: dict[str, dict[str, float]] = {}
        try:
            mv = engine.repository.get(model)
            config = mv.config
            for batch in batches:
                ids = [
                    (await engine.open_session(model, "", "", {}, 0, "bench")).session_id
                    for _ in range(batch)
                ]
                inputs = one_timestep(config, batch)
                steps = [(n, sid, inputs, None, None) for n, sid in enumerate(ids)]
                round_trip = EngineRound(engine, steps).run

                for _ in range(5):
                    await round_trip()
                rounds, start = 0, time.perf_counter()
                while time.perf_counter() - start < duration_s:
                    await round_trip()
                    rounds += 1
                elapsed = time.perf_counter() - start
                out[str(batch)] = {
                    "step_s": elapsed / rounds,
                    "steps_per_s": batch * rounds / elapsed,
                }
                await engine.close_sessions(ids, "bench")
        finally:
            await engine.stop()
        return out

    return asyncio.run(measure())


class EngineRound:
    """One round of steps submitted to an in-process engine at once, awaited until every one
    is answered (the engine floor's and ``engine_cpu``'s unit of work). A step that fails
    fails the measurement: a figure with failed steps in it would be wrong."""

    def __init__(self, engine: Any, steps: list) -> None:
        import asyncio

        self._engine, self._steps = engine, steps
        self._answered = 0
        self._failed: object = None
        self._done = asyncio.Event()

    async def run(self) -> None:
        self._answered, self._failed = 0, None
        self._done.clear()
        self._engine.submit(self._steps, "bench", self)
        await self._done.wait()
        if self._failed is not None:
            raise RuntimeError(f"step failed: {self._failed}")

    def __call__(self, outcomes: list) -> None:
        for outcome in outcomes:
            if outcome.error is not None and self._failed is None:
                self._failed = outcome.error
        self._answered += len(outcomes)
        if self._answered >= len(self._steps):
            self._done.set()


def sync_client_steps(
    address: str, model: str, threads: int, inputs: dict[str, tuple[int, ...]], duration_s: float
) -> dict[str, float]:
    """The SDK's synchronous client used from ``threads`` threads, one session each, closed loop:
    steps/s. How an application without asyncio (a web worker pool) would call rnnserve."""
    import threading

    from rnnserve.client import Client

    rng = np.random.default_rng(0)
    x = {
        name: rng.standard_normal([1, *shape]).astype(np.float32) for name, shape in inputs.items()
    }
    counts = [0] * threads
    with Client(address) as client:
        sessions = [client.open_session(model) for _ in range(threads)]
        start_at = time.perf_counter() + 0.5
        end_at = start_at + duration_s

        def work(i: int) -> None:
            session = sessions[i]
            while time.perf_counter() < start_at:
                session.step(**x)
            n = 0
            while time.perf_counter() < end_at:
                session.step(**x)
                n += 1
            counts[i] = n

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        for session in sessions:
            session.close()
    return {"steps_per_s": sum(counts) / duration_s, "threads": threads}
