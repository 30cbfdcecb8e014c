"""The Kubernetes manifests under deploy/k8s validate offline and keep sessions on one replica."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(found).exists():
        pytest.skip(f"{name} is not installed (it is in the dev extra)")
    return found


def test_manifests_validate_against_kubernetes_schemas() -> None:
    tool = _tool("kubernetes-validate")
    out = subprocess.run(
        [tool, "--strict", *map(str, MANIFESTS)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") + out.stderr.count("passed") == len(_resources())


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


def test_replicas_request_a_gpu_probe_grpc_health_and_drain() -> None:
    deployment = next(
        r for r in _resources() if r["kind"] == "Deployment" and r["metadata"]["name"] == "rnnserve"
    )
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert "preStop" in container["lifecycle"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_envoy_config_hashes_the_session_header_and_validates(tmp_path: Path) -> None:
    config_map = next(r for r in _resources() if r["kind"] == "ConfigMap")
    envoy_yaml = config_map["data"]["envoy.yaml"]
    envoy = yaml.safe_load(envoy_yaml)
    cluster = envoy["static_resources"]["clusters"][0]
    assert cluster["lb_policy"] == "RING_HASH"
    assert cluster["type"] == "STRICT_DNS"
    route = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = route["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["route"]["hash_policy"] == [
        {"header": {"header_name": "x-rnnserve-session-id"}}
    ]
    binary = _tool("envoy")
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_yaml)
    out = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
