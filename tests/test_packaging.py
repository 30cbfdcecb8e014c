"""The install layout: one ``rnnserve.*`` namespace mapped onto the top-level folders."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("module", "folder"),
    [
        ("rnnserve.server", "server"),
        ("rnnserve.client", "client"),
        ("rnnserve.models", "models"),
        ("rnnserve.v1", "proto/rnnserve/v1"),
        ("rnnserve.bench", "benchmarks/bench"),
        ("rnnserve.testing", "tests/testing"),
    ],
)
def test_each_namespace_part_maps_to_its_top_level_folder(module: str, folder: str) -> None:
    imported = importlib.import_module(module)
    assert imported.__file__ is not None
    assert Path(imported.__file__).resolve().parent == (ROOT / folder).resolve()


def test_rnnserve_itself_is_an_implicit_namespace() -> None:
    import rnnserve

    assert getattr(rnnserve, "__file__", None) is None


@pytest.mark.parametrize("module", ["rnnserve.client", "rnnserve.server", "rnnserve.server.cli"])
def test_client_and_server_never_import_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
