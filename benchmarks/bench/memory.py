"""Server memory per open session: the RSS the server process gains per session opened."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import psutil
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2


async def _open(address: str, model: str, count: int, in_flight: int = 128) -> list[str]:
    ids: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        remaining = count
        while remaining:
            batch = min(in_flight, remaining)
            replies = await asyncio.gather(
                *(stub.OpenSession(pb.OpenSessionRequest(model=model)) for _ in range(batch))
            )
            ids += [r.session.session_id for r in replies]
            remaining -= batch
    return ids


async def _step_all(
    address: str, ids: list[str], inputs: dict[str, tuple[int, ...]], per_message: int = 256
) -> None:
    """One timestep for every session, coalesced on one stream, so each holds its last reply."""
    tensors = {
        name: tensor_pb2.Tensor(
            dtype=tensor_pb2.DATA_TYPE_FLOAT32,
            shape=[1, *shape],
            data=np.ones([1, *shape], np.float32).tobytes(),
        )
        for name, shape in inputs.items()
    }
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.InferenceServiceStub(channel).StreamSteps()
        for start in range(0, len(ids), per_message):
            part = ids[start : start + per_message]
            await call.write(
                pb.StreamStepsRequest(
                    steps=[pb.StepRequest(session_id=s, inputs=tensors) for s in part]
                )
            )
            answered = 0
            while answered < len(part):
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise RuntimeError("stream ended early")
                answered += len(reply.results)
        await call.done_writing()


def session_memory(
    address: str, model: str, pid: int, sessions: int, inputs: dict[str, tuple[int, ...]]
) -> dict[str, float]:
    """Open ``sessions`` sessions and report the server's RSS growth per session.

    A few sessions are opened first so one-time costs (first allocations, code paths warmed)
    are not charged to the measured ones. The sessions stay open; the caller's server owns
    them until it stops. Then every session takes one step, and the growth is measured
    again: a server that keeps each session's last reply (for safe retries) pays for it here.
    """
    process = psutil.Process(pid)
    asyncio.run(_open(address, model, 16))
    time.sleep(0.5)
    before = process.memory_info().rss
    start = time.perf_counter()
    ids = asyncio.run(_open(address, model, sessions))
    elapsed = time.perf_counter() - start
    time.sleep(0.5)
    after = process.memory_info().rss
    asyncio.run(_step_all(address, ids, inputs))
    time.sleep(0.5)
    stepped = process.memory_info().rss
    return {
        "sessions": sessions,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_per_session_bytes": (after - before) / sessions,
        "open_per_s": sessions / elapsed,
        "rss_after_one_step_bytes": stepped,
        "rss_per_session_after_one_step_bytes": (stepped - before) / sessions,
    }
