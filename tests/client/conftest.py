"""SDK integration tests run against the real server the whole run shares (tests/conftest.py:
``test_repository`` and ``server``, a child process on loopback serving tiny ONNX models).

Only the integration modules use these fixtures; the codec, error-mapping and import tests
run without a server.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def sdk_testing() -> ModuleType:
    """The server's test helpers (build_test_repository, ServerProcess, run_reference)."""
    return pytest.importorskip("rnnserve.testing")


@pytest.fixture(scope="session")
def sdk_repository(test_repository: Path) -> Path:
    """The shared repository: tiny_rnn, tiny_lstm (v1, v2), tiny_peephole, tiny_gru(_torch)."""
    return Path(test_repository)


@pytest.fixture
def target(server: Any) -> str:
    """The address (host:port) of the server process shared by the whole run."""
    return str(server.address)
