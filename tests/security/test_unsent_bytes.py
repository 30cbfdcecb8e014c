"""A StreamSteps call's results waiting to be sent are bounded in bytes
(``--unsent-bytes-per-stream``), not only in steps.

A client that writes steps and never reads its replies leaves their results in the server.
The stream's bound of 4,096 steps counts them, but a step's result may be large: an LSTM run
over 65,536 timesteps answers 2 MiB of outputs (eight float32 a timestep) for a 1 MiB
request, and the identity's budgets (``--steps-per-identity``, ``--bytes-per-identity``) are
given back as soon as the engine answers. Under the step bound alone one stream could leave
4,096 x 2 MiB = 8 GiB of unsent results in a frontend. Here alice's stream of such steps is
never read until the server has done all it will do for it: the server's memory stays
bounded (the stream stops being read, so gRPC's flow control holds the client back), and once
she reads, every result comes, in order, none refused. A single result larger than the whole
bound still gets through. Each test runs with one frontend and with two frontend processes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from reliability.harness import (
    MODEL,
    ServerProcess,
    build_repository,
    inputs_for,
    step_request,
    stub,
)
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .identities import ALICE, auth, token_file
from .memory import PeakRss, tree_rss_mb

MIB = 1 << 20
CHUNK = 65_536  # timesteps of a step: 1 MiB of inputs, 2 MiB of outputs
HUGE = 262_144  # ... 4 MiB of inputs, 8 MiB of outputs
OPTIONS = [
    ("grpc.max_send_message_length", 64 * MIB),
    ("grpc.max_receive_message_length", 64 * MIB),
]


def _server(tmp_path: Path, frontends: int, *flags: str) -> ServerProcess:
    return ServerProcess(
        build_repository(tmp_path / "repository", max_timesteps=HUGE),
        *("--token-file", str(token_file(tmp_path)), "--frontends", str(frontends)),
        *("--max-message-bytes", str(64 * MIB), *flags),
        log_path=tmp_path / "server.log",
    )


def _open(service: pb_grpc.InferenceServiceStub) -> str:
    reply = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
    return reply.session.session_id


def _settled(service: pb_grpc.InferenceServiceStub, session_id: str, end: int) -> int:
    """The session's position once the server has done all it will for a stream nobody
    reads: every step applied (``end``), or the position unchanged for a second (the stream
    is no longer read)."""
    last = -1
    for _ in range(600):
        request = pb.GetSessionRequest(session_id=session_id)
        position = service.GetSession(request, metadata=auth(ALICE)).session.position
        if position == end or position == last:
            return position
        last = position
        time.sleep(1)
    raise AssertionError(f"the session is still moving at position {last}")


def _one_step_messages(
    session_id: str, timesteps: int, count: int
) -> Iterator[pb.StreamStepsRequest]:
    message = pb.StreamStepsRequest(steps=[step_request(session_id, inputs_for(1, 0, timesteps))])
    for _ in range(count):
        yield message


#: Steps alice's stream carries, each answered with 2 MiB: 640 MiB of results, far past the
#: default bound of 64 MiB a stream.
UNREAD_STEPS = 320
#: How much the server may grow while her results are unread: 64 MiB of them, those of the
#: steps in flight, gRPC's buffers each way, and the engine's working memory. Measured on two
#: cores before the bound: +739 MiB with one frontend, +915 to +948 with two (all 320 steps
#: applied, every result held). With it: +100 and +109 to +112 (33 steps applied).
UNREAD_GROWTH_BOUND_MB = 384


@pytest.mark.parametrize("frontends", [1, 2])
def test_a_stream_whose_replies_are_not_read_holds_a_bounded_amount_of_results(
    tmp_path: Path, frontends: int
) -> None:
    """alice streams 320 steps with 2 MiB results and reads nothing: the server stops
    reading her stream instead of holding 640 MiB of her results; once she reads, every
    result comes, in order."""
    with _server(tmp_path, frontends) as server:
        assert server.process is not None
        pid = server.process.pid
        with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
            service = stub(channel)
            own = _open(service)
            # onnxruntime keeps the memory of its largest run: have it before measuring.
            warm = step_request(_open(service), inputs_for(0, 0, CHUNK))
            service.Step(warm, metadata=auth(ALICE), timeout=60)
            before = tree_rss_mb(pid)
            with PeakRss(pid, tree_rss_mb) as rss:
                replies = service.StreamSteps(
                    _one_step_messages(own, CHUNK, UNREAD_STEPS),
                    metadata=auth(ALICE),
                    timeout=600,
                )
                held = _settled(service, own, CHUNK * UNREAD_STEPS)
            growth = rss.peak - before
            print(
                f"server RSS {before:.0f} MiB, peak {rss.peak:.0f} MiB ({growth:+.0f}) with "
                f"{held // CHUNK} of {UNREAD_STEPS} steps applied and nothing read"
            )
            results = [result for reply in replies for result in reply.results]
    assert held < CHUNK * UNREAD_STEPS  # the stream was held back, not read to its end
    assert [r.WhichOneof("outcome") for r in results] == ["response"] * UNREAD_STEPS
    assert [r.response.position for r in results] == [CHUNK * n for n in range(1, UNREAD_STEPS + 1)]
    assert growth < UNREAD_GROWTH_BOUND_MB


@pytest.mark.parametrize("frontends", [1, 2])
def test_a_result_larger_than_the_whole_bound_still_gets_through(
    tmp_path: Path, frontends: int
) -> None:
    """Under a bound of 4 MiB, alice's stream of steps answered 8 MiB each (every one larger
    than the whole bound) and of small steps between them is held while she does not read,
    and delivers every result, in order, once she does: nothing waits on room that a
    result larger than the bound can never find."""
    with _server(tmp_path, frontends, "--unsent-bytes-per-stream", str(4 * MIB)) as server:
        with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
            service = stub(channel)
            own = _open(service)
            huge = step_request(own, inputs_for(1, 0, HUGE))
            small = step_request(own, inputs_for(1, 1, 1))
            messages = [pb.StreamStepsRequest(steps=[huge, small, small]) for _ in range(8)]
            replies = service.StreamSteps(iter(messages), metadata=auth(ALICE), timeout=300)
            end = 8 * (HUGE + 2)
            held = _settled(service, own, end)
            print(f"{held} of {end} timesteps applied with nothing read")
            results = [result for reply in replies for result in reply.results]
    # Held back: 64 MiB of results are far more than gRPC buffers for a client not reading.
    assert held < end
    assert [r.WhichOneof("outcome") for r in results] == ["response"] * 24
    positions, at = [], 0
    for _ in range(8):
        for timesteps in (HUGE, 1, 1):
            at += timesteps
            positions.append(at)
    assert [r.response.position for r in results] == positions
    assert max(len(r.SerializeToString()) for r in results) > 8 * MIB
