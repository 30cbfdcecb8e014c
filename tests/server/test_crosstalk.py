"""200 sessions interleaved over several streams and unary calls each get their own outputs.

Sessions of every model are spread over three StreamSteps streams (several steps of several
sessions per message, a session's next step often sent before its previous one is
answered) and plain Step calls, in a seeded random order. Every session's outputs must equal
its own sequence run alone, and the batch-size histogram must show batches of more than one.
"""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import TEST_MODELS, ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .helpers import assert_close, joined, metric, outputs_of, reference

SESSIONS = 200
STREAMS = 3


async def test_no_crosstalk_while_batching(
    server: ServerProcess, channel: grpc.aio.Channel, test_repository
) -> None:  # noqa: ANN001
    rng = random.Random(7)
    stub = pb_grpc.InferenceServiceStub(channel)
    models = {
        name: (await stub.GetModel(pb.GetModelRequest(name=name))).model for name in TEST_MODELS
    }
    before = _batches(server.metrics_port)
    sessions = []
    for n in range(SESSIONS):
        model = models[TEST_MODELS[n % len(TEST_MODELS)]]
        opened = await stub.OpenSession(pb.OpenSessionRequest(model=model.name))
        steps = rng.randint(3, 8)
        x = np.random.default_rng(n).standard_normal((steps, 4)).astype(np.float32)
        lane = n % (STREAMS + 1)  # lanes 0..STREAMS-1 stream, the last lane is unary
        sessions.append((opened.session.session_id, model, x, lane))
    got: dict[str, list[dict[str, np.ndarray]]] = {sid: [] for sid, *_ in sessions}

    async def unary(sid: str, x: np.ndarray) -> None:
        for t in range(len(x)):
            await asyncio.sleep(rng.random() * 0.002)
            reply = await stub.Step(
                pb.StepRequest(session_id=sid, inputs={"x": from_array(x[t : t + 1])})
            )
            got[sid].append(outputs_of(reply))

    async def stream(lane: int) -> None:
        mine = [(sid, x) for sid, _, x, ln in sessions if ln == lane]
        cursor = {sid: 0 for sid, _ in mine}

        async def requests():  # noqa: ANN202
            pending = [sid for sid, _ in mine for _ in range(len(dict(mine)[sid]))]
            rng.shuffle(pending)
            xs = dict(mine)
            while pending:
                take = rng.randint(1, 12)
                batch, pending = pending[:take], pending[take:]
                steps = []
                for sid in batch:
                    t = cursor[sid]
                    cursor[sid] += 1
                    steps.append(
                        pb.StepRequest(
                            session_id=sid,
                            request_id=f"{sid}:{t}",
                            inputs={"x": from_array(xs[sid][t : t + 1])},
                        )
                    )
                yield pb.StreamStepsRequest(steps=steps)
                await asyncio.sleep(rng.random() * 0.002)

        seen: dict[str, int] = {sid: 0 for sid, _ in mine}
        async for message in stub.StreamSteps(requests()):
            for result in message.results:
                assert result.WhichOneof("outcome") == "response", result.error
                sid, t = result.request_id.rsplit(":", 1)
                assert int(t) == seen[sid], "results out of per-session order"
                seen[sid] += 1
                got[sid].append(outputs_of(result.response))

    await asyncio.gather(
        *(stream(lane) for lane in range(STREAMS)),
        *(unary(sid, x) for sid, _, x, lane in sessions if lane == STREAMS),
    )
    for sid, model, x, _ in sessions:
        assert_close(joined(got[sid], model), {"Y": reference(test_repository, model, x)["Y"]})
    after = _batches(server.metrics_port)
    batches, singles = after[0] - before[0], after[1] - before[1]
    assert batches > 0
    assert batches > singles, "every batch held a single step: no batching"


def _batches(metrics_port: int) -> tuple[float, float]:
    """(batches run, batches of one step) over all models, from /metrics."""
    count = metric(metrics_port, "rnnserve_batch_size_count")
    buckets = metric(metrics_port, "rnnserve_batch_size_bucket")
    return sum(count.values()), sum(v for k, v in buckets.items() if 'le="1.0"' in k)


def test_one_message_mixing_timesteps_and_repeating_sessions(
    server: ServerProcess, test_repository
) -> None:  # noqa: ANN001
    """Steps with different T cannot share a run; a session's two steps apply in order."""
    rng = np.random.default_rng(3)
    with grpc.insecure_channel(server.address) as sync_channel:
        stub = pb_grpc.InferenceServiceStub(sync_channel)
        model = stub.GetModel(pb.GetModelRequest(name="tiny_peephole")).model
        ids = [
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_peephole")).session.session_id
            for _ in range(4)
        ]
        plan = [(0, 1), (1, 3), (0, 2), (2, 1), (1, 1), (3, 2), (0, 1), (2, 3)]
        chunks: dict[int, list[np.ndarray]] = {n: [] for n in range(4)}
        steps = []
        for k, (n, t) in enumerate(plan):
            x = rng.standard_normal((t, 4)).astype(np.float32)
            chunks[n].append(x)
            steps.append(
                pb.StepRequest(session_id=ids[n], request_id=str(k), inputs={"x": from_array(x)})
            )
        results = [
            r
            for message in stub.StreamSteps(iter([pb.StreamStepsRequest(steps=steps)]))
            for r in message.results
        ]
    assert sorted(int(r.request_id) for r in results) == list(range(len(plan)))
    for n in range(4):
        mine = [r for r in results if r.session_id == ids[n]]
        assert [int(r.request_id) for r in mine] == [k for k, (m, _) in enumerate(plan) if m == n]
        got = joined([outputs_of(r.response) for r in mine], model)
        want = reference(test_repository, model, np.concatenate(chunks[n]))
        assert_close(got, {"Y": want["Y"]})
