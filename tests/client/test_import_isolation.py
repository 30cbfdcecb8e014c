"""The SDK imports with only grpcio, protobuf and numpy: server and training deps are blocked."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = (
    "onnxruntime",
    "onnx",
    "torch",
    "google.rpc",
    "prometheus_client",
    "typer",
    "grpc_status",
)

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked in this test: {{name}}")
            return None

    sys.meta_path.insert(0, Block())

    import rnnserve.client
    from rnnserve.client._exceptions import error_from_rpc
    import grpc

    class Failed(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.NOT_FOUND
        def details(self):
            return "gone"
        def trailing_metadata(self):
            details = ("grpc-status-details-bin", b"\\x08\\x05")
            return (details, ("rnnserve-error-reason", "SESSION_EXPIRED"))

    error = error_from_rpc(Failed())
    assert type(error) is rnnserve.client.SessionExpired, type(error)
    leaked = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    assert not leaked, leaked
    print("ok", len(rnnserve.client.__all__))
    """
)


def test_client_imports_without_server_or_training_dependencies() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
