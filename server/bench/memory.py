"""Server memory per open session: the RSS the server process gains per session opened."""

from __future__ import annotations

import asyncio
import time

import grpc
import psutil
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc


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


def session_memory(address: str, model: str, pid: int, sessions: int) -> dict[str, float]:
    """Open ``sessions`` sessions and report the server's RSS growth per session.

    A few sessions are opened first so one-time costs (first allocations, code paths warmed)
    are not charged to the measured ones. The sessions stay open; the caller's server owns
    them until it stops.
    """
    process = psutil.Process(pid)
    asyncio.run(_open(address, model, 16))
    time.sleep(0.5)
    before = process.memory_info().rss
    start = time.perf_counter()
    asyncio.run(_open(address, model, sessions))
    elapsed = time.perf_counter() - start
    time.sleep(0.5)
    after = process.memory_info().rss
    return {
        "sessions": sessions,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_per_session_bytes": (after - before) / sessions,
        "open_per_s": sessions / elapsed,
    }
