"""The pipe between frontends and the engine, against the zmq pipe it replaced.

Two processes, each on uvloop as the server runs them; the client keeps ``W`` messages in
flight (each a pickled "steps" message of 8 LSTM-sized steps) and the server answers each one
with what it decoded, pickled again. Reported per variant: round trips per second and the CPU
each process spent per round trip (from the kernel's accounting, so zmq's I/O threads count).

    python -m rnnserve.bench.ipc [--seconds 3] [--in-flight 1 8 64] [--json FILE]

``zmq`` is the pipe as it was (``zmq.asyncio`` DEALER/ROUTER over ``ipc://``, pyzmq from the
dev extra); ``unix`` is :class:`rnnserve.server.engine.ipc.Pipe` on a unix socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import pickle
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from rnnserve.server.engine.ipc import Pipe, dumps, loads

VARIANTS = ("zmq", "unix")
MESSAGE = (
    "steps",
    [
        (
            "owner",
            [(i, "session", {"x": ("<f4", (1, 32), bytes(128))}, None, None) for i in range(8)],
        )
    ],
)


def run_on_uvloop(main: Callable[[], Any]) -> Any:
    """``main()`` on uvloop, as the server runs its processes, or on asyncio's loop without it
    (an ImportError raised by ``main`` itself is not taken for a missing uvloop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _unbounded(socket: Any) -> None:
    import zmq

    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)


def _server(variant: str, address: str, ready: Any) -> None:
    async def main() -> None:
        if variant == "zmq":
            import zmq
            import zmq.asyncio

            socket = zmq.asyncio.Context().socket(zmq.ROUTER)
            _unbounded(socket)
            socket.bind(f"ipc://{address}")
            ready.send(True)
            while True:
                peer, data = await socket.recv_multipart()
                socket.send_multipart([peer, dumps(loads(data))], flags=zmq.NOBLOCK)
        else:
            pipes: list[Pipe] = []

            def connected() -> Pipe:
                pipe = Pipe(lambda p, message: p.send(message))
                pipes.append(pipe)
                return pipe

            await asyncio.get_running_loop().create_unix_server(connected, address)
            ready.send(True)
            await asyncio.Event().wait()

    run_on_uvloop(main)


def _client(variant: str, address: str, in_flight: int, seconds: float) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        answered = 0
        stop_at = loop.time() + seconds

        def answer(message: Any) -> None:
            nonlocal answered
            answered += 1
            if loop.time() < stop_at:
                send(MESSAGE)
            elif not done.done():
                done.set_result(None)

        if variant == "zmq":
            import zmq
            import zmq.asyncio

            socket = zmq.asyncio.Context().socket(zmq.DEALER)
            _unbounded(socket)
            socket.connect(f"ipc://{address}")

            def send(message: Any) -> None:
                socket.send(dumps(message), flags=zmq.NOBLOCK)

            async def reader() -> None:
                while True:
                    answer(loads(await socket.recv()))

            tasks = [loop.create_task(reader())]
        else:
            pipe = Pipe(lambda _, message: answer(message))
            await loop.create_unix_connection(lambda: pipe, address)
            send = pipe.send
            tasks = []
        started = time.perf_counter()
        for _ in range(in_flight):
            send(MESSAGE)
        await done
        rate = answered / (time.perf_counter() - started)
        for task in tasks:
            task.cancel()
        return rate

    result: float = run_on_uvloop(main)
    return result


def measure(variant: str, in_flight: int, seconds: float) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="rnnserve-ipc-"))
    address = str(folder / "pipe.sock")
    context = mp.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=_server, args=(variant, address, child_end), daemon=True)
    process.start()
    try:
        parent_end.recv()
        server = psutil.Process(process.pid)
        before_server = server.cpu_times()
        before_client = resource.getrusage(resource.RUSAGE_SELF)
        rate = _client(variant, address, in_flight, seconds)
        after_server = server.cpu_times()
        after_client = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        process.kill()
        process.join()
    trips = rate * seconds
    server_s = (after_server.user + after_server.system) - (
        before_server.user + before_server.system
    )
    client_s = (after_client.ru_utime + after_client.ru_stime) - (
        before_client.ru_utime + before_client.ru_stime
    )
    return {
        "round_trips_per_s": rate,
        "server_cpu_us": server_s / trips * 1e6,
        "client_cpu_us": client_s / trips * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each variant")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results: list[dict[str, Any]] = []
    for in_flight in args.in_flight:
        for _ in range(args.rounds):
            for variant in VARIANTS:
                row = {"variant": variant, "in_flight": in_flight}
                row.update(measure(variant, in_flight, args.seconds))
                results.append(row)
                print(
                    f"in flight {in_flight:3d}  {variant:4s}  "
                    f"{row['round_trips_per_s']:9,.0f} round trips/s  "
                    f"server {row['server_cpu_us']:5.1f} µs  client {row['client_cpu_us']:5.1f} µs",
                    flush=True,
                )
    if args.json is not None:
        report = {
            "benchmark": "ipc",
            "python": platform.python_version(),
            "cpus": psutil.cpu_count(),
            "seconds": args.seconds,
            "message_bytes": len(pickle.dumps(MESSAGE)),
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
