"""A Docker engine for the compose test, and the stack it runs, torn down whatever happens.

If a Docker daemon already answers (``DOCKER_HOST`` or the default socket), it is used as it
is. Otherwise, as root, a private ``dockerd`` is started with its own data root, exec root and
socket (so nothing else on the machine sees it) and stopped by its pid at the end; its data
root stays as a cache of the base image between runs. The compose stack runs under its own
project name and is taken down with its containers, networks, volumes and images.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .tools import ROOT, find_tool, log_tail, wait_until

# The private daemon's places. The data root outlives the daemon: a cache of the base image.
STATE = Path(os.environ.get("RNNSERVE_DOCKER_STATE", "/var/lib/rnnserve-compose-test"))
RUN = Path("/run/rnnserve-compose-test")
LOCK = Path("/run/rnnserve-compose-test.lock")
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 900.0

BASE_IMAGE = os.environ.get("RNNSERVE_BASE_IMAGE", "debian:bookworm-slim")
BASE_SCRIPT = ROOT / "deploy" / "docker" / "debian-base.sh"
CA_DIR = ROOT / "deploy" / "docker" / "ca-certificates"
HOST_CA_DIR = Path(os.environ.get("RNNSERVE_EXTRA_CA_DIR", "/usr/local/share/ca-certificates"))


@dataclass
class Engine:
    """A Docker daemon the tests may use: the environment that points the clients at it."""

    env: dict[str, str]
    started: bool  # whether this run started the daemon (and so stops it)
    docker: str  # the docker CLI
    compose: str  # docker-compose (v1)
    log: Path  # where commands' output goes

    def run(
        self, argv: Sequence[str], timeout_s: float = 120.0, check: bool = True, record: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command against this engine; it (and its output if ``record``) goes to the log."""
        started = time.monotonic()
        result = subprocess.run(
            list(argv), env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
        )
        with self.log.open("a") as sink:
            sink.write(f"$ {shlex.join(argv)}  ({time.monotonic() - started:.1f} s)\n")
            sink.write((result.stdout if record else "") + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result

    def docker_cmd(
        self, *args: str, timeout_s: float = 120.0, check: bool = True, record: bool = True
    ) -> str:
        return self.run([self.docker, *args], timeout_s, check, record).stdout.strip()

    def has_image(self, name: str) -> bool:
        return self.run([self.docker, "image", "inspect", name], check=False).returncode == 0

    def image_size(self, name: str) -> int:
        return int(self.docker_cmd("image", "inspect", "--format", "{{.Size}}", name))


def _answers(docker: str, env: dict[str, str]) -> bool:
    """Whether a daemon answers at the place ``env`` names."""
    try:
        probe = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"],
            env=env,
            capture_output=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


@contextlib.contextmanager
def _exclusive(lock: Path, timeout_s: float) -> Iterator[None]:
    """One compose test on the machine at a time (two daemons would fight over docker0)."""
    with lock.open("w") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another compose test held {lock} for {timeout_s:.0f} s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


# --- what dockerd changes in the host's network, put back when it stops --------------------
# dockerd adds iptables chains and rules (and sets the FORWARD policy to DROP, which would
# drop bridged traffic of other tests, e.g. tests/scaleout's namespaces) and turns on IP
# forwarding; none of it is undone when it exits. Only Docker's own rules are removed.
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TABLES = ("nat", "filter")
DOCKER_MARKS = ("DOCKER", "docker0", "br-")


@dataclass(frozen=True)
class HostNetwork:
    """The iptables rules (``iptables -S`` lines) of each table and the forwarding switch."""

    rules: dict[str, tuple[str, ...]]
    ip_forward: str

    @classmethod
    def read(cls) -> HostNetwork | None:
        if find_tool("iptables") is None:
            return None
        try:
            rules = {table: tuple(_iptables("-t", table, "-S").splitlines()) for table in TABLES}
        except AssertionError:  # iptables cannot read the tables here: nothing to put back
            return None
        return cls(rules, IP_FORWARD.read_text().strip())

    def restore(self) -> None:
        """Remove the Docker rules and chains added since ``read``; reset policies, forwarding."""
        for table in TABLES:
            before = set(self.rules[table])
            now = _iptables("-t", table, "-S").splitlines()
            added = [
                line for line in now if line not in before and any(m in line for m in DOCKER_MARKS)
            ]
            for line in reversed([line for line in added if line.startswith("-A ")]):
                _iptables("-t", table, "-D", *shlex.split(line)[1:], check=False)
            chains = [line.split()[1] for line in added if line.startswith("-N ")]
            for chain in chains:
                _iptables("-t", table, "-F", chain, check=False)
            for chain in chains:
                _iptables("-t", table, "-X", chain, check=False)
            for line in self.rules[table]:
                if line.startswith("-P "):
                    _iptables("-t", table, *line.split(), check=False)
        IP_FORWARD.write_text(self.ip_forward + "\n")


def _iptables(*args: str, check: bool = True) -> str:
    result = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"iptables {shlex.join(args)}: {result.stderr}")
    return result.stdout


@contextlib.contextmanager
def docker_engine(work: Path) -> Iterator[Engine]:
    """A usable Docker engine; skips (saying why) when there is none and none can start."""
    docker = find_tool("docker")
    compose = find_tool("docker-compose")
    if docker is None or compose is None:
        pytest.skip("docker / docker-compose not found; apt-get install docker.io docker-compose")
    log = work / "docker.log"
    env = dict(os.environ)
    if _answers(docker, env):
        yield Engine(env, False, docker, compose, log)
        return

    dockerd = find_tool("dockerd")
    if dockerd is None:
        pytest.skip(
            "no Docker daemon answers and dockerd is not installed (apt-get install docker.io)"
        )
    if os.geteuid() != 0:
        pytest.skip("no Docker daemon answers and starting dockerd needs root")

    with _exclusive(LOCK, LOCK_TIMEOUT_S):
        RUN.mkdir(parents=True, exist_ok=True)
        STATE.mkdir(parents=True, exist_ok=True)
        socket = RUN / "docker.sock"
        env["DOCKER_HOST"] = f"unix://{socket}"
        bridge_existed = _link_exists("docker0")
        network = HostNetwork.read()
        daemon_log = work / "dockerd.log"
        argv = [
            dockerd,
            f"--data-root={STATE / 'docker'}",
            f"--exec-root={RUN / 'exec'}",
            f"--pidfile={RUN / 'dockerd.pid'}",
            f"--host={env['DOCKER_HOST']}",
            "--storage-driver=overlay2",
        ]
        with daemon_log.open("wb") as sink:
            # Its own session: a Ctrl-C at the terminal reaches the test, which then stops it.
            daemon = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:

            def up() -> bool:
                assert daemon.poll() is None, f"dockerd exited:\n{log_tail(daemon_log)}"
                return _answers(docker, env)

            wait_until("dockerd to answer", up, DAEMON_START_TIMEOUT_S)
            yield Engine(env, True, docker, compose, log)
        finally:
            _stop_daemon(daemon, daemon_log)
            if not bridge_existed and _link_exists("docker0"):
                subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True)
            if network is not None:
                network.restore()


def _stop_daemon(daemon: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM (dockerd stops its containers and its containerd), then SIGKILL if it hangs."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(DAEMON_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(10)
    # Its containerd exits with it; make sure, by the pid file it leaves in the exec root
    # (checking that the pid is still that containerd before signalling it).
    pidfile = RUN / "exec" / "containerd" / "containerd.pid"
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pidfile.read_text().strip())
        if str(RUN) in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGKILL)


def ensure_base_image(engine: Engine) -> float:
    """The base every image builds FROM; made with mmdebstrap when absent. Seconds spent."""
    if engine.has_image(BASE_IMAGE):
        return 0.0
    if find_tool("mmdebstrap") is None:
        pytest.skip(
            f"no {BASE_IMAGE} image and no mmdebstrap to make one (apt-get install mmdebstrap)"
        )
    started = time.monotonic()
    engine.run([str(BASE_SCRIPT), BASE_IMAGE], timeout_s=600)
    return time.monotonic() - started


def stage_ca_certificates() -> list[str]:
    """Copy the host's extra CA certificates into the build input folder; their names."""
    names = []
    for cert in sorted(HOST_CA_DIR.glob("*.crt")):
        target = CA_DIR / cert.name
        if not target.exists() or target.read_bytes() != cert.read_bytes():
            target.write_bytes(cert.read_bytes())
        names.append(cert.name)
    return names


@dataclass
class Stack:
    """docker-compose.yml with the stand-ins override, under one project name."""

    engine: Engine
    project: str
    files: tuple[Path, ...]
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout_s: float = 300.0, check: bool = True) -> str:
        argv = [self.engine.compose, "--ansi", "never", "-p", self.project]
        for path in self.files:
            argv += ["-f", str(path)]
        env = {**self.engine.env, **self.env}
        engine = Engine(
            env, self.engine.started, self.engine.docker, self.engine.compose, self.engine.log
        )
        return engine.run([*argv, *args], timeout_s, check).stdout

    def image(self, service: str) -> str:
        """The image the service runs, as the compose files resolve it."""
        config = yaml.safe_load(self.compose("config"))
        return str(config["services"][service]["image"])

    def container(self, service: str) -> str:
        """The id of the service's (only) container."""
        found = self.compose("ps", "-q", service).split()
        assert len(found) == 1, f"{service}: containers {found}"
        return found[0]

    def inspect(self, service: str) -> dict:  # type: ignore[type-arg]
        found = self.engine.docker_cmd("inspect", self.container(service), record=False)
        return json.loads(found)[0]

    def health(self, service: str) -> str:
        state = self.inspect(service)["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))

    def ip(self, service: str) -> str:
        networks = self.inspect(service)["NetworkSettings"]["Networks"]
        (network,) = networks.values()
        return str(network["IPAddress"])

    def wait_healthy(self, services: Sequence[str], timeout_s: float = 120.0) -> None:
        def healthy() -> bool:
            return all(self.health(service) == "healthy" for service in services)

        try:
            wait_until(f"{', '.join(services)} healthy", healthy, timeout_s)
        except AssertionError as error:
            report = []
            for service in services:
                state = self.inspect(service)["State"]
                checks = state.get("Health", {}).get("Log", [])
                last = checks[-1] if checks else {}
                report.append(
                    f"{service}: {state['Status']} {state.get('Health', {}).get('Status', '')}"
                    f" last check exit {last.get('ExitCode')} {last.get('Output', '')[-300:]!r}"
                )
            raise AssertionError(f"{error}\n" + "\n".join(report)) from None

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False)

    def down(self, remove_images: bool) -> None:
        args = ["down", "--volumes", "--remove-orphans", "--timeout", "10"]
        if remove_images:
            args += ["--rmi", "all"]
        self.compose(*args, check=False)
