"""A real ``redis-server`` (Debian's package) on a free loopback port, for the scale-out tests.

It runs with ``--save '' --appendonly no``: nothing is written unless a test asks for a
``SAVE``, which lets a test kill Redis and start it again on the same port and data folder
with the data it saved (Redis loads ``dump.rdb`` at start even with saving turned off).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
import redis

REDIS_SERVER = "/usr/bin/redis-server"


def redis_server_binary() -> str:
    """Path of redis-server, or skip saying how to get it."""
    found = REDIS_SERVER if Path(REDIS_SERVER).exists() else shutil.which("redis-server")
    if found is None:
        pytest.skip(
            "redis-server is not installed: apt-get install redis-server (make system-deps)"
        )
    return found


class RedisServer:
    """One redis-server child process; ``kill`` and ``start`` again keep port and folder."""

    def __init__(self, folder: Path, port: int, host: str = "127.0.0.1") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port
        self.binary = redis_server_binary()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def start(self, *prefix: str) -> RedisServer:
        """Start it (``prefix`` runs it through e.g. ``ip netns exec NAME``); wait for PONG."""
        argv = [
            *prefix,
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.folder),
            "--dbfilename", "dump.rdb",
            "--protected-mode", "no",
        ]  # fmt: skip
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log.read_text()[-2000:]}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server not up:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: gone at once, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def left_behind(client: redis.Redis, pattern: str) -> list[bytes]:
    """Keys matching ``pattern`` that are more than a session store's bookkeeping: holder
    records (which replica holds a session) with the token of the claim that wrote one
    (``#claim``, gone with it), and finished or given-up take tokens (``#void:<token>``, gone
    within a minute) are not counted."""

    def bookkeeping(key: bytes) -> bool:
        return key.endswith((b"#holder", b"#claim")) or (
            b"#void:" in key and 0 < client.pttl(key) <= 60_000
        )

    return [key for key in client.keys(pattern) if not bookkeeping(key)]
