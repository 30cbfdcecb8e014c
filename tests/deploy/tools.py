"""Helpers of the deployment tests: find the external tools, run them as child processes on
loopback, and render the compose configuration files for loopback ports.

The files under deploy/ are the single source of truth: the tests load them and rewrite only
hostnames, ports and intervals, so what runs here is what docker compose runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = ROOT / "docker-compose.gpu.yml"
NODE_EXAMPLE = ROOT / "examples" / "node"

T = TypeVar("T")


def find_tool(name: str) -> str | None:
    """``name`` on PATH or next to the running interpreter (a venv's console scripts)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str, how: str) -> str:
    """The tool's path, or skip the test saying how to get it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not found on PATH or beside {sys.executable}; {how}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just handed out."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(what: str, check: Callable[[], T | None], timeout_s: float = 30.0) -> T:
    """Poll ``check`` until it returns something other than None/False; fail after timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, urllib.error.URLError, ValueError) as error:
            last_error, value = error, None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} ({last_error})")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """Status and body of a GET (4xx/5xx answered too, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def metric_totals(url: str) -> dict[str, float]:
    """Every sample of a Prometheus page at ``url``, summed over labels, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = http_get(url)
    assert status == 200, f"{url}: HTTP {status}"
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def http_json(url: str) -> Any:
    status, body = http_get(url)
    assert status == 200, f"GET {url}: {status} {body[:200]!r}"
    return json.loads(body)


@contextlib.contextmanager
def child_process(argv: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with output to ``log``; terminate it (then kill) on exit."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)


def log_tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# --- rendering the compose configuration for loopback -------------------------------------


def render_envoy(
    *, listener_port: int, admin_port: int, upstreams: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml with loopback ports and ``upstreams`` as the replicas.

    The compose file names replicas by DNS; here they are literal addresses, so the cluster
    becomes STATIC. Routing (ring hash on the session header), HTTP/2 and the health checks
    are kept as they are, apart from a shorter health-check interval.
    """
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    config["admin"]["address"]["socket_address"] = _loopback(admin_port)
    (listener,) = config["static_resources"]["listeners"]
    listener["address"]["socket_address"] = _loopback(listener_port)
    (cluster,) = config["static_resources"]["clusters"]
    compose_endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert len(compose_endpoints) == len(upstreams), "one loopback replica per compose replica"
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {"endpoint": {"address": {"socket_address": _loopback(port, host)}}}
                for host, port in upstreams
            ]
        }
    ]
    for check in cluster.get("health_checks", []):
        check["interval"] = "1s"
    return config


def _loopback(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return {"address": host, "port_value": port}


def render_prometheus(
    *, replica_targets: Sequence[str], envoy_target: str, scrape_interval: str = "1s"
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the replicas and Envoy at loopback addresses."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    groups = jobs["rnnserve"]["static_configs"]
    assert len(groups) == len(replica_targets), "one loopback replica per compose replica"
    for group, target in zip(groups, replica_targets, strict=True):
        group["targets"] = [target]
    jobs["envoy"]["static_configs"] = [{"targets": [envoy_target]}]
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
