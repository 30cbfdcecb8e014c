"""A real rnnserve server (child process, loopback, tiny hand-built ONNX models) for SDK tests.

Only the integration modules use these fixtures; the codec, error-mapping and import tests
run without a server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def sdk_testing() -> ModuleType:
    """The server's test helpers (build_test_repository, ServerProcess, run_reference)."""
    return pytest.importorskip("rnnserve.server.testing")


@pytest.fixture(scope="module")
def sdk_repository(sdk_testing: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding tiny_rnn, tiny_lstm (v1, v2), tiny_peephole, tiny_gru(_torch)."""
    return Path(sdk_testing.build_test_repository(tmp_path_factory.mktemp("sdk-repository")))


@pytest.fixture(scope="module")
def sdk_server(sdk_testing: Any, sdk_repository: Path) -> Iterator[Any]:
    """One server process shared by a test module; tests open their own sessions."""
    with sdk_testing.ServerProcess(sdk_repository) as server:
        yield server


@pytest.fixture
def target(sdk_server: Any) -> str:
    """The server's address, host:port."""
    return str(sdk_server.address)
