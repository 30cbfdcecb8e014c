"""The Node.js example (examples/node) streams a session that matches a Python run exactly.

A client in another language, built only from the .proto files, must see the same outputs
and positions as the Python stubs for the same inputs: this proves the wire format (raw
little-endian tensors, the session header, StreamSteps ordering) is usable outside Python.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .conftest import Topology, server_testing
from .stubs import MODEL, TIMEOUT_S, channel, from_tensor, input_spec, run_session
from .tools import NODE_EXAMPLE, require_tool

CHUNKS = (1, 1, 3, 1, 2, 1, 1, 4)  # timesteps of each step: single steps and chunks
NPM_TIMEOUT_S = 180
NODE_TIMEOUT_S = 60
ENVOY_SESSIONS = 6  # all pass by chance without affinity: 2**-6


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with examples/node's dependencies installed (npm ci if absent)."""
    node = require_tool("node", "install Node.js >= 18 to run the Node example")
    npm = require_tool("npm", "install npm to fetch the Node example's dependencies")
    if not (NODE_EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_EXAMPLE,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm ci took over {NPM_TIMEOUT_S}s; is the npm registry reachable?")
        if result.returncode != 0:
            pytest.skip(f"npm ci failed (npm registry unavailable?):\n{result.stderr[-2000:]}")
    return node


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[str]:
    with server_testing().ServerProcess(repository) as process:
        yield process.address


def _write_plan(stub: pb_grpc.InferenceServiceStub, path: Path) -> list[np.ndarray]:
    """Seeded steps for the model, written as the Node example's steps file."""
    input_name, features = input_spec(stub)
    rng = np.random.default_rng(5)
    steps = [rng.standard_normal((t, features), dtype=np.float32) for t in CHUNKS]
    plan = {"model": MODEL, "input": input_name, "steps": [step.tolist() for step in steps]}
    path.write_text(json.dumps(plan))
    return steps


def _run_node(node: str, target: str, plan: Path, session_id: str) -> list[dict[str, Any]]:
    """Runs examples/node/stream_session.js; its stdout is one JSON line per step."""
    run = subprocess.run(
        [node, "stream_session.js", "--target", target, "--steps", str(plan)]
        + ["--session-id", session_id],
        cwd=NODE_EXAMPLE,
        capture_output=True,
        text=True,
        timeout=NODE_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_node_client_matches_python_stubs(node: str, server: str, tmp_path: Path) -> None:
    with channel(server) as direct:
        stub = pb_grpc.InferenceServiceStub(direct)
        input_name, _ = input_spec(stub)
        steps = _write_plan(stub, tmp_path / "steps.json")
        node_steps = _run_node(node, server, tmp_path / "steps.json", "node-session")

        python_steps = run_session(stub, "python-session", input_name, steps)

        # The Node client closed its session.
        with pytest.raises(grpc.RpcError) as closed:
            stub.GetSession(pb.GetSessionRequest(session_id="node-session"), timeout=TIMEOUT_S)
        assert closed.value.code() == grpc.StatusCode.NOT_FOUND

    assert [s["step"] for s in node_steps] == list(range(len(CHUNKS)))
    assert [s["position"] for s in node_steps] == list(np.cumsum(CHUNKS))
    assert [r.position for r in python_steps] == list(np.cumsum(CHUNKS))
    for node_step, python_step in zip(node_steps, python_steps, strict=True):
        assert set(node_step["outputs"]) == set(python_step.outputs)
        for name, tensor in python_step.outputs.items():
            expected = from_tensor(tensor)
            got = node_step["outputs"][name]
            assert tuple(got["shape"]) == expected.shape, name
            np.testing.assert_allclose(
                np.asarray(got["values"]).reshape(expected.shape), expected, rtol=0, atol=1e-5
            )


def test_node_client_sessions_route_through_envoy(
    node: str, topology: Topology, tmp_path: Path
) -> None:
    """Through Envoy every call of a Node session must reach one replica: without the session
    header each session would break (NOT_FOUND) with probability 1/2."""
    with channel(topology.envoy) as ingress:
        _write_plan(pb_grpc.InferenceServiceStub(ingress), tmp_path / "steps.json")
    for index in range(ENVOY_SESSIONS):
        node_steps = _run_node(node, topology.envoy, tmp_path / "steps.json", f"node-{index}")
        assert [s["position"] for s in node_steps] == list(np.cumsum(CHUNKS))
