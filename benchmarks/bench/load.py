"""Closed-loop load generators, each run in its own process.

Every measurement, against the echo floor or rnnserve, goes through the same code here: raw
grpc.aio stubs (no SDK layer, so the client adds as little as it can), sessions opened
first, then a warm-up, then a measurement window in which each request's latency is kept.
The parent starts the window for all load processes at once through a shared event, so
their windows line up.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2

MODES = ("step", "stream", "coalesced")
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


@dataclass(frozen=True)
class LoadSpec:
    """One load process's share of a measurement.

    ``step``: one unary Step loop per session. ``stream``: one StreamSteps stream per
    session, one step per message. ``coalesced``: one stream per process whose every message
    carries one step of each of its sessions (how a multiplexing client would send them).
    """

    address: str
    model: str
    mode: str
    sessions: int
    timesteps: int  # K timesteps per step request
    inputs: dict[str, tuple[int, ...]]
    warmup_s: float
    duration_s: float
    seed: int = 0
    #: HTTP/2 connections this process opens, sessions dealt over them in turn. A server
    #: with several frontends shares its port by SO_REUSEPORT, which spreads connections, not
    #: calls: one connection reaches one frontend, however many streams it carries.
    channels: int = 1


@dataclass
class LoadResult:
    """What one load process measured inside the window."""

    steps: int = 0  # session steps completed (each of ``timesteps`` timesteps)
    messages: int = 0  # request messages answered
    errors: int = 0
    window_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # per request message
    first_error: str = ""


def _step_request(spec: LoadSpec, session_id: str, rng: np.random.Generator) -> pb.StepRequest:
    inputs = {
        name: tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32,
            shape=[spec.timesteps, *shape],
            data=rng.standard_normal([spec.timesteps, *shape]).astype(np.float32).tobytes(),
        )
        for name, shape in spec.inputs.items()
    }
    return pb.StepRequest(session_id=session_id, inputs=inputs)


class _Window:
    """Counts only what completes between the window's start and end."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.result = LoadResult(window_s=end - start)

    def record(self, sent: float, done: float, steps: int) -> None:
        if self.start <= sent and done <= self.end:
            self.result.steps += steps
            self.result.messages += 1
            self.result.latencies_s.append(done - sent)


async def _step_loop(stub, request, window: _Window) -> None:
    while time.perf_counter() < window.end:
        sent = time.perf_counter()
        await stub.Step(request)
        window.record(sent, time.perf_counter(), 1)


async def _stream_loop(stub, requests: list[pb.StepRequest], window: _Window) -> None:
    message = pb.StreamStepsRequest(steps=requests)
    call = stub.StreamSteps()
    try:
        while time.perf_counter() < window.end:
            sent = time.perf_counter()
            await call.write(message)
            answered = 0
            while answered < len(requests):  # a server may answer a message in parts
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise RuntimeError("stream ended early")
                for result in reply.results:
                    if result.WhichOneof("outcome") == "error":
                        raise RuntimeError(f"step error: {result.error.message}")
                answered += len(reply.results)
            window.record(sent, time.perf_counter(), len(requests))
    finally:
        await call.done_writing()
        call.cancel()


async def _run(spec: LoadSpec, ready, go, start_at) -> LoadResult:
    rng = np.random.default_rng(spec.seed)
    # Channels with their own subchannel pool: each its own connection (channels alike in
    # one process would otherwise share one).
    options = [*_OPTIONS, ("grpc.use_local_subchannel_pool", 1)] if spec.channels > 1 else _OPTIONS
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            pb_grpc.InferenceServiceStub(
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(spec.address, options=options)
                )
            )
            for _ in range(max(1, spec.channels))
        ]
        stub = stubs[0]
        opened = await asyncio.gather(
            *(
                stubs[i % len(stubs)].OpenSession(pb.OpenSessionRequest(model=spec.model))
                for i in range(spec.sessions)
            )
        )
        ids = [o.session.session_id for o in opened]
        requests = [_step_request(spec, sid, rng) for sid in ids]
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        start = time.perf_counter() + (start_at.value - time.time()) + spec.warmup_s
        window = _Window(start, start + spec.duration_s)
        # Session i was opened on stubs[i % len(stubs)], and steps there.
        if spec.mode == "step":
            tasks = [_step_loop(stubs[i % len(stubs)], r, window) for i, r in enumerate(requests)]
        elif spec.mode == "stream":
            tasks = [
                _stream_loop(stubs[i % len(stubs)], [r], window) for i, r in enumerate(requests)
            ]
        else:
            tasks = [_stream_loop(stub, requests, window)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                window.result.errors += 1
                window.result.first_error = window.result.first_error or repr(outcome)[:300]
        await asyncio.gather(
            *(
                stubs[i % len(stubs)].CloseSession(pb.CloseSessionRequest(session_id=s), timeout=10)
                for i, s in enumerate(ids)
            ),
            return_exceptions=True,
        )
        return window.result


def _worker(spec: LoadSpec, ready, go, start_at, results) -> None:
    try:
        results.put(asyncio.run(_run(spec, ready, go, start_at)))
    except BaseException as exc:  # the parent must hear of any failure, not wait forever
        ready.set()
        results.put(LoadResult(errors=1, first_error=repr(exc)[:300]))


def run_load(spec: LoadSpec, processes: int) -> LoadResult:
    """Split ``spec.sessions`` over ``processes`` load processes and merge what they saw."""
    ctx = mp.get_context("spawn")
    processes = max(1, min(processes, spec.sessions))
    go, start_at, results = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    shares = [
        spec.sessions // processes + (i < spec.sessions % processes) for i in range(processes)
    ]
    workers, readies = [], []
    for i, share in enumerate(shares):
        ready = ctx.Event()
        part = LoadSpec(**{**spec.__dict__, "sessions": share, "seed": spec.seed + i})
        worker = ctx.Process(target=_worker, args=(part, ready, go, start_at, results), daemon=True)
        worker.start()
        workers.append(worker)
        readies.append(ready)
    budget = time.monotonic() + 120
    for ready in readies:
        ready.wait(max(0.0, budget - time.monotonic()))
    start_at.value = time.time() + 0.2
    go.set()
    limit = spec.warmup_s + spec.duration_s + 120
    parts = [results.get(timeout=limit) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        if worker.is_alive():
            worker.kill()
    merged = LoadResult(window_s=spec.duration_s)
    for part in parts:
        merged.steps += part.steps
        merged.messages += part.messages
        merged.errors += part.errors
        merged.latencies_s += part.latencies_s
        merged.first_error = merged.first_error or part.first_error
    return merged
