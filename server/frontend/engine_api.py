"""What a frontend needs of the engine: the :class:`~rnnserve.server.engine.core.Engine`
itself when both run in one process, or :class:`~.engine_client.EngineClient` across
processes. Handlers are written against this protocol only, so both are one code path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..engine.batcher import Sink
from ..engine.core import StepIn
from ..engine.lifecycle import VersionStatus
from ..engine.store import SessionInfo
from ..repository import Repository


class EngineApi(Protocol):
    def catalogue(self) -> Repository: ...

    def on_catalogue(self, listener: Callable[[Repository], None]) -> None:
        """Call ``listener`` with each new catalogue (versions loaded, retired, released)."""

    async def open_session(
        self,
        model: str,
        version: str,
        session_id: str,
        state: dict[str, np.ndarray],
        position: int,
        owner: str,
    ) -> SessionInfo: ...

    async def get_session(self, session_id: str, owner: str) -> SessionInfo: ...

    async def export_state(
        self, session_id: str, owner: str
    ) -> tuple[SessionInfo, dict[str, np.ndarray]]: ...

    async def fork_session(
        self, session_id: str, new_session_id: str, owner: str
    ) -> SessionInfo: ...

    async def reset_session(
        self, session_id: str, state: dict[str, np.ndarray], owner: str
    ) -> SessionInfo: ...

    async def close_session(self, session_id: str, owner: str) -> None: ...

    async def close_sessions(self, session_ids: list[str], owner: str) -> int: ...

    def submit(self, steps: list[StepIn], owner: str, sink: Sink) -> None: ...

    async def predict(
        self,
        model: str,
        version: str,
        arrays: dict[str, np.ndarray],
        state: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]: ...

    # -- model lifecycle (AdminService) -------------------------------------------------------
    async def load_model(self, model: str, version: str) -> list[VersionStatus]: ...

    async def retire_model(self, model: str, version: str, by: str) -> VersionStatus: ...

    async def repository_index(self) -> list[VersionStatus]: ...

    async def move_session(self, session_id: str, owner: str, version: str) -> SessionInfo: ...
