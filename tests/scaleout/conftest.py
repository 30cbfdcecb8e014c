"""Fixtures of the scale-out tests: a real redis-server and servers that park sessions in it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy.tools import free_port

from .redis_server import RedisServer, redis_server_binary


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free loopback port for the module's tests."""
    redis_server_binary()
    with RedisServer(tmp_path_factory.mktemp("redis"), free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def scaleout_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-built test models with room for 1,000 sessions each."""
    testing = pytest.importorskip("rnnserve.testing")
    return Path(testing.build_test_repository(tmp_path_factory.mktemp("scaleout-repository")))


@pytest.fixture(scope="session")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test models with 4 slots each: ten times as many sessions must park."""
    testing = pytest.importorskip("rnnserve.testing")
    limits = {"max_queue_delay_us": 2000, "max_sessions": 4}
    return Path(testing.build_test_repository(tmp_path_factory.mktemp("small"), limits))
