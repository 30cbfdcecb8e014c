"""When a batch starts: at once when waiting cannot make it larger, else after the queue delay.

The models here have a queue delay of 5 s, far longer than any of these tests runs: every
batch that starts before it is one the batcher chose to start early, and the
``rnnserve_batch_starts`` counter says why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, build_test_repository
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

DELAY_US = 5_000_000
MODEL = "tiny_gru"


@pytest.fixture(scope="module")
def slow_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("batching")
    repository = build_test_repository(Path(root), limits={"max_queue_delay_us": DELAY_US})
    with ServerProcess(repository) as process:
        yield process


def _starts(server: ServerProcess) -> dict[str, float]:
    """Batches of MODEL started so far, by the reason they started."""
    reasons = ("full", "cohort", "delay", "immediate")
    return {r: server.metric("rnnserve_batch_starts_total", model=MODEL, reason=r) for r in reasons}


def _batches(server: ServerProcess) -> tuple[float, float]:
    """(batches run, steps run in them) for MODEL so far."""
    count = server.metric("rnnserve_batch_size_count", model=MODEL)
    return count, server.metric("rnnserve_batch_size_sum", model=MODEL)


def _x(seed: int) -> pb.Tensor:
    return from_array(np.random.default_rng(seed).standard_normal((1, 4)).astype(np.float32))


async def _open(stub: pb_grpc.InferenceServiceStub, n: int) -> list[str]:
    replies = [await stub.OpenSession(pb.OpenSessionRequest(model=MODEL)) for _ in range(n)]
    return [r.session.session_id for r in replies]


async def test_a_lone_session_does_not_wait_for_the_queue_delay(
    slow_queue_server: ServerProcess,
) -> None:
    before = _starts(slow_queue_server)
    async with grpc.aio.insecure_channel(slow_queue_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        (sid,) = await _open(stub, 1)
        for t in range(5):
            reply = await stub.Step(pb.StepRequest(session_id=sid, inputs={"x": _x(t)}))
            assert reply.position == t + 1
    after = _starts(slow_queue_server)
    # Nobody else stepped recently: each step started its own batch at once.
    assert after.get("cohort", 0) - before.get("cohort", 0) == 5
    assert after.get("delay", 0) == before.get("delay", 0)


async def test_sessions_stepping_together_are_gathered_into_one_batch(
    slow_queue_server: ServerProcess,
) -> None:
    await asyncio.sleep(0.2)  # sessions idle for longer than 50 ms are no longer waited for
    async with grpc.aio.insecure_channel(slow_queue_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sessions = await _open(stub, 24)
        # Counted before round 1 (one batch, one message): reading metrics between the rounds
        # could itself outlast the cohort window on a busy machine.
        count_before, steps_before = _batches(slow_queue_server)
        # Round 1, all in one stream message: the sessions become each other's cohort.
        message = pb.StreamStepsRequest(
            steps=[
                pb.StepRequest(session_id=s, inputs={"x": _x(i)}) for i, s in enumerate(sessions)
            ]
        )
        results = [r async for m in stub.StreamSteps(iter([message])) for r in m.results]
        assert all(r.HasField("response") for r in results)
        # Round 2, 24 separate calls at once: the batch waits for the whole cohort, not 5 s.
        replies = await asyncio.gather(
            *(
                stub.Step(pb.StepRequest(session_id=s, inputs={"x": _x(i)}))
                for i, s in enumerate(sessions)
            )
        )
        assert {r.position for r in replies} == {2}
        count_after, steps_after = _batches(slow_queue_server)
    assert steps_after - steps_before == 48
    assert count_after - count_before == 2, "each round of 24 steps ran as one batch"
    assert _starts(slow_queue_server).get("delay", 0) == 0


@pytest.fixture(scope="module")
def short_queue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("batching-short")
    # 20 ms: shorter than the 50 ms for which a quiet session is still waited for.
    repository = build_test_repository(Path(root), limits={"max_queue_delay_us": 20_000})
    with ServerProcess(repository) as process:
        yield process


async def test_a_step_waits_at_most_the_queue_delay_for_a_session_that_stays_silent(
    short_queue_server: ServerProcess,
) -> None:
    async with grpc.aio.insecure_channel(short_queue_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        first, second = await _open(stub, 2)
        before = _starts(short_queue_server)
        stream = stub.StreamSteps()
        await stream.write(
            pb.StreamStepsRequest(
                steps=[pb.StepRequest(session_id=s, inputs={"x": _x(0)}) for s in (first, second)]
            )
        )
        answered = 0
        while answered < 2:
            answered += len((await stream.read()).results)
        # The second session just stepped, so the first one's step waits for it, then goes alone.
        await stream.write(
            pb.StreamStepsRequest(steps=[pb.StepRequest(session_id=first, inputs={"x": _x(1)})])
        )
        (result,) = (await stream.read()).results
        assert result.response.position == 2
        await stream.done_writing()
    assert _starts(short_queue_server)["delay"] - before["delay"] == 1
