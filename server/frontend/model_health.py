"""grpc.health.v1 per model and per model version, following the catalogue as versions are
loaded and retired: a probe (or a load balancer) asks for ``tiny_lstm`` or ``tiny_lstm:2``.

A model is SERVING while one of its versions takes new sessions and NOT_SERVING while all of
them retire; a version is SERVING when READY and NOT_SERVING while it retires; either is
SERVICE_UNKNOWN once it is gone (grpc health has no way to forget a name).
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health, health_pb2

from ..repository import Repository

logger = logging.getLogger(__name__)
_Status = health_pb2.HealthCheckResponse


def statuses(catalogue: Repository) -> dict[str, int]:
    """Health status by service name for every model and version of ``catalogue``."""
    found: dict[str, int] = {}
    for name in catalogue.models:
        ready = False
        for mv in catalogue.models[name].values():
            retiring = mv.key in catalogue.retiring
            ready = ready or not retiring
            found[mv.key] = _Status.NOT_SERVING if retiring else _Status.SERVING
        found[name] = _Status.SERVING if ready else _Status.NOT_SERVING
    return found


class ModelHealth:
    """Keeps one frontend's health servicer in step with the engine's catalogue."""

    def __init__(self, servicer: health.aio.HealthServicer) -> None:
        self._servicer = servicer
        self._known: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def update(self, catalogue: Repository) -> None:
        async with self._lock:  # updates apply in the order the catalogue changed
            now = statuses(catalogue)
            for name, status in now.items():
                if self._known.get(name) != status:
                    await self._servicer.set(name, status)
            for name in self._known.keys() - now.keys():
                await self._servicer.set(name, _Status.SERVICE_UNKNOWN)
            self._known = now

    def listener(self, catalogue: Repository) -> None:
        """For ``engine.on_catalogue``: called outside a coroutine, so the update is a task."""
        task = asyncio.get_running_loop().create_task(self.update(catalogue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
