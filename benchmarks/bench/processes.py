"""Starting the two servers under test (rnnserve and the echo floor) in their own processes.

Both are started the same way a user would, and report readiness through a port file, so
the benchmark needs nothing from the server's internals.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Running:
    """A server process the benchmark talks to."""

    address: str
    pid: int


@contextlib.contextmanager
def _process(argv: list[str], port_file: Path, log: Path, timeout_s: float) -> Iterator[Running]:
    port_file.unlink(missing_ok=True)  # a stale file from an earlier run would lie
    with log.open("wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while not port_file.exists():
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[:4]} exited: {log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[:4]} not ready in {timeout_s} s")
                time.sleep(0.05)
            info = json.loads(port_file.read_text())
            yield Running(f"127.0.0.1:{info['grpc_port']}", process.pid)
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def echo_server(outputs: dict[str, tuple[int, ...]], workdir: Path) -> Iterator[Running]:
    """The transport floor in its own process."""
    port_file = workdir / "echo-port.json"
    argv = [
        sys.executable,
        "-m",
        "rnnserve.bench.echo",
        "--port-file",
        str(port_file),
        "--outputs",
        json.dumps({k: list(v) for k, v in outputs.items()}),
    ]
    with _process(argv, port_file, workdir / "echo.log", 30) as running:
        yield running


@contextlib.contextmanager
def rnnserve_server(repository: Path, *extra_args: str) -> Iterator[Running]:
    """``rnnserve serve`` on loopback with ephemeral ports, as the tests start it."""
    from rnnserve.testing import ServerProcess

    with ServerProcess(repository, *extra_args, start_timeout_s=120) as server:
        assert server.process is not None
        yield Running(server.address, server.process.pid)
