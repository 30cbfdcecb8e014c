"""The committed gRPC stubs are exactly what protoc makes from proto/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

grpc_tools = pytest.importorskip("grpc_tools")
from grpc_tools import protoc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "proto"


def test_generated_stubs_match_the_proto_files(tmp_path: Path) -> None:
    shutil.copytree(PROTO, tmp_path / "proto", ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    out = tmp_path / "proto"
    protos = sorted(str(p.relative_to(out)) for p in (out / "rnnserve" / "v1").glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "protoc",
            f"-I{out}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            *[str(out / p) for p in protos],
        ]
    )
    assert rc == 0
    generated = sorted((out / "rnnserve" / "v1").glob("*_pb2*.py*"))
    assert generated, "protoc produced nothing"
    for fresh in generated:
        committed = PROTO / "rnnserve" / "v1" / fresh.name
        assert committed.exists(), f"{fresh.name} is generated but not committed; run make stubs"
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale; run make stubs"
