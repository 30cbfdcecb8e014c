"""Shared pytest setup. Each part adds its fixtures in its own marked block below."""

from __future__ import annotations

import os

import pytest


# --- lead: slow variants -------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=os.environ.get("RNNSERVE_RUNSLOW") == "1",
        help="also run the long variants (full soak, full benchmarks); env RNNSERVE_RUNSLOW=1",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="long variant: run with --runslow or RNNSERVE_RUNSLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# --- end lead ------------------------------------------------------------------------------


# --- server: test repository, server process, channels ---------------------------------------
@pytest.fixture(scope="session")
def test_repository(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """The hand-built tiny models (rnnserve.testing.build_test_repository)."""
    testing = pytest.importorskip("rnnserve.testing")
    return testing.build_test_repository(tmp_path_factory.mktemp("test-repository"))


@pytest.fixture(scope="session")
def server(test_repository):  # noqa: ANN001, ANN201
    """One real server process over the test repository, shared by the whole run.

    ``RNNSERVE_TEST_SLABS=device`` serves it with state in OrtValue slabs bound through
    IOBinding (the path a GPU takes) instead of the CPU default.
    """
    testing = pytest.importorskip("rnnserve.testing")
    slabs = os.environ.get("RNNSERVE_TEST_SLABS", "")
    extra = ("--slabs", slabs) if slabs else ()
    with testing.ServerProcess(test_repository, *extra) as process:
        yield process


@pytest.fixture
async def channel(server):  # noqa: ANN001, ANN201
    """A grpc.aio channel to the shared server."""
    import grpc

    async with grpc.aio.insecure_channel(server.address) as aio_channel:
        yield aio_channel


@pytest.fixture(scope="session")
def default_repository():  # noqa: ANN201
    """The trained default repository named by RNNSERVE_TEST_REPOSITORY, or skip."""
    from pathlib import Path

    value = os.environ.get("RNNSERVE_TEST_REPOSITORY", "")
    if not value or not Path(value).is_dir():
        pytest.skip(
            "no trained default repository: set RNNSERVE_TEST_REPOSITORY to a folder "
            "made by `rnnserve build-defaults`"
        )
    return Path(value)


# --- end server ------------------------------------------------------------------------------
