"""The deployments run the replicas with the shared state store they also define.

Kubernetes (deploy/k8s) and compose (docker-compose.yml) each define a Redis and point every
rnnserve replica at it with --state-store; the address must name that Redis's service and
port, and the serve command must accept the flags as written.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import yaml
from deploy.tools import COMPOSE_FILE, ROOT

K8S = ROOT / "deploy" / "k8s"


def _flag(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _k8s() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_k8s_replicas_park_and_hand_off_in_the_redis_the_manifests_define() -> None:
    resources = _k8s()
    by_kind = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    replica = by_kind[("Deployment", "rnnserve")]["spec"]["template"]["spec"]["containers"][0]
    url = urllib.parse.urlsplit(_flag(replica["args"], "--state-store"))
    service = by_kind[("Service", url.hostname)]
    assert url.port in [port["port"] for port in service["spec"]["ports"]]
    redis = by_kind[("Deployment", "rnnserve-redis")]
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert "noeviction" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert float(_flag(replica["args"], "--park-after-s")) > 0
    assert "preStop" in replica["lifecycle"]


def test_compose_replicas_park_and_hand_off_in_the_compose_redis() -> None:
    compose = yaml.safe_load(Path(COMPOSE_FILE).read_text())
    replicas = {name: svc for name, svc in compose["services"].items() if "build" in svc}
    assert len(replicas) >= 2
    for name, service in replicas.items():
        url = urllib.parse.urlsplit(_flag(service["command"], "--state-store"))
        assert url.hostname in compose["services"], name
        redis = compose["services"][url.hostname]
        assert "redis-server" in redis["command"] and url.port == 6379
        assert "redis" in service["depends_on"], name


def test_serve_accepts_the_deployed_flags(tmp_path: Path) -> None:
    """The flags as deployed parse and validate (a typo would stop every replica)."""
    from rnnserve.server.app import ServerConfig

    compose = yaml.safe_load(Path(COMPOSE_FILE).read_text())
    replica = next(svc for svc in compose["services"].values() if "build" in svc)
    args = replica["command"]
    config = ServerConfig(
        repository=tmp_path,
        state_store=_flag(args, "--state-store"),
        park_after_s=float(_flag(args, "--park-after-s")),
    )
    assert config.problems() == []
