"""Network namespaces for the multi-host rehearsal: each replica gets its own network stack
and address on a bridge in the root namespace, as if it ran on its own host.

Everything made here is removed on exit, also when the test fails. Needs root (CAP_NET_ADMIN)
and iproute2; :func:`require_namespaces` skips the test saying why when they are missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SUBNET = "10.213.{}.{}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def require_namespaces() -> None:
    """Skip unless this process can make a network namespace (root, iproute2)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (the ip command) is not installed")
    probe = f"rnnprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {made.stderr.strip()}")
    _ip("netns", "delete", probe, check=False)


@dataclass(frozen=True)
class Hosts:
    """The bridge address (root namespace) and one (namespace, address) per replica."""

    gateway: str
    members: tuple[tuple[str, str], ...]


@contextlib.contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """``count`` namespaces, each with a veth on one bridge in a /24 of its own."""
    tag = uuid.uuid4().hex[:6]
    net = 100 + int(tag, 16) % 100
    bridge = f"rnnbr{tag}"
    made: list[str] = []
    veths: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        gateway = SUBNET.format(net, 1)
        _ip("addr", "add", f"{gateway}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        members = []
        for i in range(count):
            ns, outer = f"rnn{tag}{i}", f"rnnv{tag}{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            veths.append(outer)
            _ip("link", "set", outer, "master", bridge, "up")
            address = SUBNET.format(net, 10 + i)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            members.append((ns, address))
        yield Hosts(gateway, tuple(members))
    finally:
        for ns in made:
            _ip("netns", "delete", ns, check=False)
        for veth in veths:
            _ip("link", "delete", veth, check=False)
        _ip("link", "delete", bridge, check=False)


class NamespacedServer:
    """``rnnserve serve`` run inside a namespace with ``ip netns exec``, on ``address``."""

    def __init__(
        self, namespace: str, address: str, repository: Path, folder: Path, *args: str
    ) -> None:
        self.address_host = address
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "server.log"
        port_file = folder / "ports.json"
        argv = ["ip", "netns", "exec", namespace, sys.executable, "-m", "rnnserve.server"]
        argv += ["serve", "--repository", str(repository), "--host", address, "--port", "0"]
        argv += ["--metrics-port", "0", "--port-file", str(port_file), *args]
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server in {namespace} did not start:\n{self.stderr()}")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text())
        self.grpc_port = int(ports["grpc_port"])
        self.metrics_port = int(ports["metrics_port"])
        # ip netns exec execs the server: SIGTERM to this pid reaches the server itself.
        assert int(ports["pid"]) == self.process.pid

    @property
    def address(self) -> str:
        return f"{self.address_host}:{self.grpc_port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def namespaced_servers(
    members: Sequence[tuple[str, str]], repository: Path, folder: Path, *args: str
) -> Iterator[list[NamespacedServer]]:
    servers: list[NamespacedServer] = []
    try:
        for i, (ns, address) in enumerate(members):
            servers.append(NamespacedServer(ns, address, repository, folder / f"r{i}", *args))
        yield servers
    finally:
        for server in servers:
            server.stop()
