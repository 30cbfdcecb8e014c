"""Drive one rnnserve session from Python: open, step, stream, export, fork, close.

    python examples/python/stream_session.py --target 127.0.0.1:50051 --model tiny_lstm

Needs only the SDK (``pip install rnnserve``: grpcio, protobuf, numpy) and a running server.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
from rnnserve.client import AsyncClient, RnnserveError, SessionNotFound


async def main(target: str, model: str, timesteps: int) -> None:
    rng = np.random.default_rng(0)
    async with AsyncClient(target) as client:
        async with await client.open_session(model) as session:
            (spec,) = session.model.data_inputs
            features = spec.shape[1:]  # per-session input is (T, features...)
            x = rng.standard_normal((timesteps, *features)).astype(spec.dtype)

            # One step carrying two timesteps; the server keeps the state afterwards.
            y = await session.step(x[:2])
            print(f"step: output {np.shape(y)}, position {session.position}")

            # The rest, one timestep per message, pipelined over one stream: outputs come back
            # in order, while replies arrive several at a time, so read the position after.
            t = 2
            async for y in session.steps(x[k : k + 1] for k in range(2, timesteps)):
                print(f"streamed: timestep {t}, output {np.shape(y)}")
                t += 1
            print(f"after the stream: position {session.position}")

            # Fork: a second session that continues from the same state.
            async with await session.fork() as branch:
                print(f"forked {branch.session_id} at position {branch.position}")

            state = await session.export_state()
            print(f"exported {sorted(state.state)} at position {state.position}")

        try:
            await session.step(x[:1])
        except SessionNotFound as exc:
            print(f"after close: {type(exc).__name__} ({exc.reason})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--model", default="tiny_lstm")
    parser.add_argument("--timesteps", type=int, default=6)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.target, args.model, args.timesteps))
    except RnnserveError as exc:
        raise SystemExit(f"error: {exc}") from None
