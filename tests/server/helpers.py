"""Small helpers shared by the server tests: stubs, inputs, reading results and metrics."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from rnnserve.server.engine.batcher import Outcome
from rnnserve.server.engine.core import Engine
from rnnserve.server.engine.ipc import EngineServer
from rnnserve.server.frontend.engine_client import EngineClient
from rnnserve.server.frontend.tensors import from_array, to_array
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.testing import run_reference
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

TOL = 1e-5


@asynccontextmanager
async def running_engine(repository: Repository) -> AsyncIterator[Engine]:
    """An engine over ``repository``, in-process, started for the block and stopped after.
    The block begins once the batchers wait for work, as a server's do between calls."""
    engine = Engine(repository, Metrics())
    await engine.start()
    await asyncio.sleep(0)
    try:
        yield engine
    finally:
        await engine.stop()


@asynccontextmanager
async def engine_over_pipe(
    repository: Repository, folder: Path
) -> AsyncIterator[tuple[Engine, EngineServer, EngineClient]]:
    """An engine served on a unix socket in ``folder`` and a frontend's client connected to
    it, all on this loop (as the engine and a frontend process are, each on its own)."""
    async with running_engine(repository) as engine:
        server = EngineServer(engine, str(folder / "engine.sock"))
        await server.start()
        client = EngineClient(server.address)
        try:
            await client.connect()
            yield engine, server, client
        finally:
            await client.close()
            await server.close()


@contextmanager
def stub_for(address: str) -> Iterator[pb_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def data_input(model: pb.Model) -> pb.TensorSpec:
    (spec,) = [t for t in model.inputs if t.time_axis != -1]
    return spec


def sequence(model: pb.Model, timesteps: int, seed: int) -> np.ndarray:
    """Random per-session input (float) or token ids (int) for the model's input."""
    spec = data_input(model)
    shape = [timesteps if a == spec.time_axis else e for a, e in enumerate(spec.shape)]
    rng = np.random.default_rng(seed)
    if spec.dtype in (4, 5):  # int32/int64 token ids
        vocab = int(model.metadata.get("vocab_size", "2") or 2)
        return rng.integers(0, vocab, shape).astype(np.int64 if spec.dtype == 5 else np.int32)
    return rng.standard_normal(shape).astype(np.float32)


def take(x: np.ndarray, spec: pb.TensorSpec, start: int, stop: int) -> np.ndarray:
    return np.take(x, range(start, stop), axis=spec.time_axis)


def step(stub, session_id: str, name: str, x: np.ndarray, **kw) -> pb.StepResponse:  # noqa: ANN001
    return stub.Step(pb.StepRequest(session_id=session_id, inputs={name: from_array(x)}, **kw))


def outputs_of(reply: pb.StepResponse) -> dict[str, np.ndarray]:
    return {name: to_array(t, name) for name, t in reply.outputs.items()}


def joined(chunks: list[dict[str, np.ndarray]], model: pb.Model) -> dict[str, np.ndarray]:
    return {
        o.name: np.concatenate([c[o.name] for c in chunks], axis=o.time_axis) for o in model.outputs
    }


def reference(
    repository: Path, model: pb.Model, x: np.ndarray, state: dict | None = None
) -> dict[str, np.ndarray]:
    name = data_input(model).name
    return run_reference(repository, model.name, model.version, {name: x}, initial_state=state)


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=TOL, atol=TOL, err_msg=name)


def reason_of(error: grpc.RpcError) -> str:
    return dict(error.trailing_metadata() or ()).get("rnnserve-error-reason", "")


def metric(metrics_port: int, name: str) -> dict[str, float]:
    """Every sample of ``name`` on the server's /metrics page, by its label string."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        text = response.read().decode()
    samples: dict[str, float] = {}
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        samples[match.group(1) or ""] = float(match.group(2))
    return samples


def slow_runs(monkeypatch: Any, engine: Engine, model: str, seconds: float) -> None:
    """Every run of ``model`` ("name:version") goes to the model's thread and takes
    ``seconds`` longer there: the window in which a run is away from the event loop."""
    from rnnserve.server.engine import batcher as batcher_module

    monkeypatch.setattr(batcher_module, "_INLINE_MAX_RUN_S", 0.0)
    batcher = engine.batchers[model]
    execute = batcher.execute

    def slow(*args: Any) -> Any:
        time.sleep(seconds)
        return execute(*args)

    monkeypatch.setattr(batcher, "execute", slow)


class Collector:
    """A sink that keeps every outcome, in the order the engine delivered them."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.arrived = asyncio.Event()

    def __call__(self, outcomes: list[Outcome]) -> None:
        self.outcomes.extend(outcomes)
        self.arrived.set()

    async def wait_for(self, count: int) -> list[Outcome]:
        while len(self.outcomes) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 10)
        return self.outcomes
