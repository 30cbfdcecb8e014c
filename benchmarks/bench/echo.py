"""The transport floor: a bare grpc.aio InferenceService that answers with canned replies.

It speaks the same proto messages as rnnserve (OpenSession, Step, StreamSteps) and answers a
step with a StepResponse of the same size the model would send, but runs no model and keeps
no state, so whatever the benchmark measures against it is the cost of gRPC alone. It runs
in its own process (``python -m rnnserve.bench.echo``), as the server does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc
from rnnserve.v1 import tensor_pb2


class EchoService(pb_grpc.InferenceServiceServicer):
    """Answers steps with zero-filled outputs shaped (T, *per-step shape) of each output."""

    def __init__(self, outputs: dict[str, list[int]]) -> None:
        self._outputs = outputs
        self._canned: dict[int, dict[str, tensor_pb2.Tensor]] = {}

    def _reply_outputs(self, request: pb.StepRequest) -> dict[str, tensor_pb2.Tensor]:
        first = next(iter(request.inputs.values()), None)
        steps = int(first.shape[0]) if first is not None and first.shape else 1
        canned = self._canned.get(steps)
        if canned is None:
            canned = {
                name: tensor_pb2.Tensor(
                    dtype=tensor_pb2.DATA_TYPE_FLOAT32,
                    shape=[steps, *shape],
                    data=np.zeros([steps, *shape], np.float32).tobytes(),
                )
                for name, shape in self._outputs.items()
            }
            self._canned[steps] = canned
        return canned

    async def OpenSession(self, request, context):  # noqa: N802 (gRPC method name)
        session_id = request.session_id or uuid.uuid4().hex
        return pb.OpenSessionResponse(
            session=pb.Session(session_id=session_id, model=request.model)
        )

    async def CloseSession(self, request, context):  # noqa: N802
        return pb.CloseSessionResponse()

    async def Step(self, request, context):  # noqa: N802
        return pb.StepResponse(
            session_id=request.session_id, position=1, outputs=self._reply_outputs(request)
        )

    async def StreamSteps(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.StreamStepsRequest], context
    ) -> AsyncIterator[pb.StreamStepsResponse]:
        async for message in request_iterator:
            yield pb.StreamStepsResponse(
                results=[
                    pb.StepResult(
                        request_id=step.request_id,
                        session_id=step.session_id,
                        response=pb.StepResponse(
                            session_id=step.session_id,
                            position=1,
                            outputs=self._reply_outputs(step),
                        ),
                    )
                    for step in message.steps
                ]
            )


async def serve(outputs: dict[str, list[int]], port_file: Path) -> None:
    """Serve on an ephemeral loopback port and write it to ``port_file`` once listening."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb_grpc.add_InferenceServiceServicer_to_server(EchoService(outputs), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"grpc_port": port, "pid": os.getpid()}))
    tmp.replace(port_file)
    await server.wait_for_termination()


def main() -> None:
    """Entry point of the echo process."""
    parser = argparse.ArgumentParser(description="rnnserve bench transport floor")
    parser.add_argument("--outputs", required=True, help='JSON {"name": [per-step dims]}')
    parser.add_argument("--port-file", required=True, type=Path)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop, as the server may")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(serve(json.loads(args.outputs), args.port_file))


if __name__ == "__main__":
    main()
