"""The pipe between frontends and the engine never drops a message, however far one side
falls behind: a dropped "steps" or "outcomes" message is a caller that waits forever.

zmq queues at most 1,000 messages per socket by default, and past that a ROUTER socket drops
what it sends and a non-blocking DEALER send fails. Here the engine runs on its own thread and
loop (as in its own process); first its loop is held while a frontend sends 4,000 separate
step messages, then the frontend's loop is held while the engine answers each step as its own
batch (4,000 outcome messages). Every step must still be answered, in order.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
from rnnserve.server.engine.core import Engine
from rnnserve.server.engine.ipc import EngineServer
from rnnserve.server.frontend.engine_client import EngineClient
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository

from .helpers import Collector

OWNER = "tester"
STEPS = 4000  # under the model's queue limit (4,096), over zmq's 2 x 1,000


class _EngineThread:
    """An engine and its IPC server on a loop of their own, in a thread."""

    def __init__(self, repository: Path, address: str) -> None:
        self.address = address
        self._repository = repository
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None
        self._up = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.engine = Engine(load_repository(self._repository), Metrics())
        await self.engine.start()
        server = EngineServer(self.engine, self.address)
        server.start()
        self._up.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()
            await self.engine.stop()

    def start(self) -> None:
        self._thread.start()
        assert self._up.wait(60)

    def hold(self, release: threading.Event) -> None:
        """Block the engine's loop until ``release`` is set."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(release.wait, 60)

    def steps_run(self) -> float:
        assert self.engine is not None
        return sum(
            self.engine.metrics.batch_size.labels(*key.split(":"))._sum.get()  # noqa: SLF001
            for key in self.engine.batchers
        )

    def stop(self) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


async def test_a_backlog_either_way_loses_no_message(tmp_path: Path) -> None:
    repository = build_test_repository(tmp_path / "repo")
    engine = _EngineThread(repository, f"ipc://{tmp_path / 'engine.sock'}")
    engine.start()
    client = EngineClient(engine.address)
    try:
        await client.connect()
        sid = (await client.open_session("tiny_gru", "", "", {}, 0, OWNER)).session_id
        x = np.zeros((1, 4), np.float32)
        answers = Collector()
        before = engine.steps_run()

        release = threading.Event()
        engine.hold(release)  # the engine reads nothing while the frontend sends
        for ticket in range(STEPS):  # one message per turn of the frontend's loop
            client.submit([(ticket, sid, {"x": x}, None, None)], OWNER, answers)
            await asyncio.sleep(0)
        release.set()

        # Now the frontend reads nothing (its loop is held here) while the engine answers
        # each step as its own batch: one outcomes message per step.
        deadline = time.monotonic() + 60
        while engine.steps_run() - before < STEPS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.steps_run() - before == STEPS

        await answers.wait_for(STEPS)
        assert [o.ticket for o in answers.outcomes] == list(range(STEPS))
        assert all(o.error is None for o in answers.outcomes)
        assert [o.position for o in answers.outcomes] == list(range(1, STEPS + 1))
    finally:
        await client.close()
        engine.stop()
