"""Why a session is gone, as the SDK reports it: expired, evicted, or refused at capacity.

Each test starts its own server over a repository with the limits it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from rnnserve.client import (
    AsyncClient,
    CapacityExceeded,
    SessionEvicted,
    SessionExpired,
    SessionNotFound,
)

from .reference import inputs_for


@contextmanager
def _server(testing: Any, root: Path, **limits: object) -> Iterator[str]:
    repository = testing.build_test_repository(root, limits=limits)
    with testing.ServerProcess(repository) as server:
        yield server.address


async def test_an_idle_session_raises_session_expired(sdk_testing: Any, tmp_path: Path) -> None:
    with _server(sdk_testing, tmp_path, idle_timeout_s=0.2) as target:
        async with AsyncClient(target) as client:
            session = await client.open_session("tiny_rnn")
            x = inputs_for(session.model, 1, seed=90)
            await session.step(x)
            error: Exception | None = None
            for attempt in range(4):  # bounded; a probe that succeeds restarts the idle clock
                await asyncio.sleep(0.5 * 2**attempt)
                try:
                    await session.step(x)
                except SessionNotFound as exc:
                    error = exc
                    break
            assert type(error) is SessionExpired
            assert error.reason == "SESSION_EXPIRED"


async def test_the_least_recently_used_session_is_evicted(sdk_testing: Any, tmp_path: Path) -> None:
    with _server(sdk_testing, tmp_path, max_sessions=2, on_full="evict_lru") as target:
        async with AsyncClient(target) as client:
            oldest = await client.open_session("tiny_gru")
            newer = await client.open_session("tiny_gru")
            x = inputs_for(oldest.model, 1, seed=91)
            await newer.step(x)
            newest = await client.open_session("tiny_gru")
            with pytest.raises(SessionEvicted):
                await oldest.step(x)
            await newer.step(x)
            await newest.step(x)


async def test_a_full_model_refuses_new_sessions(sdk_testing: Any, tmp_path: Path) -> None:
    with _server(sdk_testing, tmp_path, max_sessions=2, on_full="reject") as target:
        async with AsyncClient(target) as client:
            first = await client.open_session("tiny_lstm")
            await client.open_session("tiny_lstm")
            with pytest.raises(CapacityExceeded):
                await client.open_session("tiny_lstm")
            await first.close()
            await client.open_session("tiny_lstm")  # the freed slot is usable
