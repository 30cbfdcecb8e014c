"""Step replies written as wire bytes parse to exactly the messages protobuf would build.

The frontend writes ``StepResponse`` and ``StreamStepsResponse`` bytes itself
(``rnnserve.server.frontend.wire``); any client in any language parses them with its own
protobuf runtime, so every field must come out as the message built the ordinary way would:
ids (empty, non-ASCII), positions (0, small, past one varint byte, the largest), outputs of
every wire dtype, scalars, empty tensors, big-endian arrays, several outputs, errors.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.batcher import Outcome
from rnnserve.server.errors import RnnserveError
from rnnserve.server.frontend.status import step_error
from rnnserve.server.frontend.tensors import from_array
from rnnserve.server.frontend.wire import serialize, step_response, step_result
from rnnserve.v1 import inference_service_pb2 as pb


def built(outcome: Outcome) -> pb.StepResponse:
    """The reply as protobuf objects, the way the frontend built it before."""
    outputs = outcome.outputs or {}
    return pb.StepResponse(
        session_id=outcome.session_id,
        position=outcome.position,
        outputs={name: from_array(batch[outcome.row]) for name, batch in outputs.items()},
    )


def parsed(data: bytes, message_type: type) -> object:
    message = message_type()
    message.ParseFromString(data)
    return message


rng = np.random.default_rng(7)
BATCHES = {
    "float32 rows": {"y": rng.standard_normal((3, 256)).astype(np.float32)},
    "float16 and int64": {
        "a": rng.standard_normal((4, 2, 3)).astype(np.float16),
        "b": rng.integers(-(2**40), 2**40, (4, 5)).astype(np.int64),
    },
    "float64 and int32": {
        "p": rng.standard_normal((2, 7)).astype(np.float64),
        "q": rng.integers(-9, 9, (2, 1)).astype(np.int32),
    },
    "rows past 16 KiB (three-byte lengths)": {
        "big": rng.standard_normal((2, 5000)).astype(np.float32)
    },
    "scalar per session": {"s": np.arange(3, dtype=np.float32)},
    "empty tensor": {"e": np.zeros((2, 0, 4), np.float32)},
    "big-endian array": {"be": rng.standard_normal((2, 3)).astype(">f4")},
    "transposed view": {"t": rng.standard_normal((5, 2)).astype(np.float32).T},
    "no outputs": {},
}


@pytest.mark.parametrize("case", sorted(BATCHES))
@pytest.mark.parametrize("position", [0, 1, 127, 128, 300, 2**31, errors.MAX_POSITION])
@pytest.mark.parametrize("session_id", ["", "s-1", "séance/ü", "x" * 200])
def test_step_response_bytes_parse_to_the_built_message(
    case: str, position: int, session_id: str
) -> None:
    batch = BATCHES[case]
    rows = next(iter(batch.values())).shape[0] if batch else 1
    for row in range(rows):
        outcome = Outcome(7, session_id, position, batch, None, row, "m:1")
        assert parsed(step_response(outcome), pb.StepResponse) == built(outcome)


def test_a_stream_message_is_its_results_joined() -> None:
    batch = BATCHES["float16 and int64"]
    ok = [Outcome(n, f"s{n}", 10 + n, batch, None, n, "m:1") for n in range(4)]
    failure = RnnserveError(
        grpc.StatusCode.FAILED_PRECONDITION, errors.POSITION_MISMATCH, "at 3, expected 5"
    )
    failed = Outcome(9, "s9", error=failure)
    outcomes = [ok[0], failed, *ok[1:]]
    request_ids = ["r0", "", "r1", "r-ü", "r3"]
    message = b"".join(step_result(o, r) for o, r in zip(outcomes, request_ids, strict=True))
    expected = pb.StreamStepsResponse(
        results=[
            pb.StepResult(request_id="r0", session_id="s0", response=built(ok[0])),
            pb.StepResult(request_id="", session_id="s9", error=step_error(failure)),
            *(
                pb.StepResult(request_id=r, session_id=o.session_id, response=built(o))
                for o, r in zip(ok[1:], request_ids[2:], strict=True)
            ),
        ]
    )
    got = parsed(message, pb.StreamStepsResponse)
    assert got == expected
    assert [r.WhichOneof("outcome") for r in got.results] == [
        "response",
        "error",
        "response",
        "response",
        "response",
    ]


def test_an_applied_step_without_outputs_still_says_response() -> None:
    """The oneof is set even when the response has no field of its own to send."""
    got = parsed(step_result(Outcome(1, "", 0, {}, None, 0), ""), pb.StreamStepsResponse)
    assert got.results[0].WhichOneof("outcome") == "response"


def test_the_serializer_passes_bytes_through_and_serializes_messages() -> None:
    message = pb.StepResponse(session_id="a", position=3)
    assert serialize(b"\x0a\x01a") == b"\x0a\x01a"
    assert serialize(message) == message.SerializeToString()
