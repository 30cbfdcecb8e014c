"""close_sessions_on_end with a state store: a session that is moving when its stream ends is
still closed, once its move is done.

The release (``Engine.close_sessions``) brings back each stepped session that is not
resident, to close it. It gave up on any error, UNAVAILABLE "retry shortly" included: a
session on its way between replicas when the stream ended (a drain handing it off, a call
back) was left open and lived on in the store, against "closed when the stream ends, however
it ends". Two in-process replicas share one real Redis here; the handoff's window is held
open as a drain holds it (sessions marked moving, not yet written).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server import errors
from rnnserve.server.engine.core import Engine
from rnnserve.server.errors import RnnserveError
from rnnserve.testing import build_test_repository
from server.helpers import Collector

from .redis_server import RedisServer
from .replicas import engines_sharing

OWNER = "alice"
_prefixes = itertools.count()


@pytest.fixture
async def replicas(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[Engine]]:
    repo = build_test_repository(
        tmp_path / "repo", {"max_queue_delay_us": 0, "max_sessions": 8, "idle_timeout_s": 60}
    )
    prefix = f"release-moving{next(_prefixes)}:"
    async with engines_sharing(repo, redis_server.url, prefix) as engines:
        yield engines


async def test_a_session_handed_off_while_its_stream_ends_is_closed(
    replicas: list[Engine],
) -> None:
    a, b = replicas
    await a.open_session("tiny_rnn", "", "s1", {}, 0, OWNER)
    sink = Collector()
    a.submit([(0, "s1", {"x": np.zeros((1, 4), np.float32)}, None, None)], OWNER, sink)
    assert (await sink.wait_for(1))[0].error is None
    await asyncio.sleep(0.1)  # A's holder record is written
    assert await a.begin_drain() == 1  # A marks it moving: the handoff has begun
    # The stream that stepped it on B ends now: B's release must close it.
    release = asyncio.create_task(b.close_sessions(["s1"], OWNER))
    await asyncio.sleep(0.3)
    await a.residency.stop()
    assert await a.residency.park_all() == 1  # the handoff writes it to the store
    assert await asyncio.wait_for(release, 10) == 1
    for replica in (b, a):
        with pytest.raises(RnnserveError) as gone:
            await replica.get_session("s1", OWNER)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND
    assert gone.value.reason in (errors.SESSION_CLOSED, errors.SESSION_NOT_FOUND)
