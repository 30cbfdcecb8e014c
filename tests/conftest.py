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
