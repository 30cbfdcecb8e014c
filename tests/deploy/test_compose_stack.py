"""docker-compose.yml run for real: images built, the stack up, a replica stopped and killed.

A real Docker engine (started here if none runs, see docker_engine.py) builds the rnnserve
image from the Dockerfile and, from docker-compose.standins.yml, stand-ins for the registry
images (Envoy from its wheel, Debian's redis-server and prometheus) that run with the same
commands, health checks and deploy/ config files. The stack comes up as users start it:
two replicas sharing Redis as their state store, Envoy hashing the session header onto them,
Prometheus scraping them. Through Envoy's published port the Python SDK then runs 100
sessions x 50 steps three times with the same inputs:

- uninterrupted: the reference every later output and position is compared with;
- while one replica is stopped (`docker-compose stop`: SIGTERM, drain, hand-off to Redis):
  nothing may be lost, every output equals the reference, positions read 1..50;
- while one replica is killed (`docker kill`, SIGKILL): as the README says, the sessions
  resident on the killed replica may be lost (the SDK raises SessionNotFound, never a wrong
  output); every other session ends exactly as the reference.

Prometheus's HTTP API must show both replicas scraped with step-latency series. Everything is
taken down at the end, whatever happened: containers, networks, volumes, the stack's images and
the Docker daemon if this test started it (the base image stays as a cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import AsyncClient, AsyncSession, ClientOptions, ServerError, SessionNotFound

from .docker_engine import (
    BASE_IMAGE,
    Stack,
    docker_engine,
    ensure_base_image,
    stage_ca_certificates,
)
from .tools import COMPOSE_FILE, ROOT, free_port, http_get, http_json, wait_until

pytestmark = pytest.mark.timeout(1200)

STANDINS_FILE = ROOT / "docker-compose.standins.yml"
PROJECT = "rnnserve-compose-test"
REPLICAS = ("rnnserve-0", "rnnserve-1")
SERVICES = (*REPLICAS, "redis", "envoy", "prometheus")  # Grafana: no image here, see README
BUILT = ("rnnserve-0", "redis", "envoy", "prometheus")
GRPC_PORT = 50051
ENVOY_ADMIN_PORT = 9901
# An LSTM of the default repository (h and c state); RNNSERVE_COMPOSE_MODEL picks another.
MODEL = os.environ.get("RNNSERVE_COMPOSE_MODEL", "sunspots_lstm")
SESSIONS = 100
STEPS = 50
INTERRUPT_AFTER = 0.3  # of all steps answered
# UNAVAILABLE (draining, or a replica gone before Envoy's health check drops it) is retried
# for up to ~40 s (the timeout bounds a call with all its retries); every step carries
# expected_position, so a retry is never applied twice.
OPTIONS = ClientOptions(timeout=40.0, retries=80, backoff=0.05, max_backoff=0.5)
KEEP_IMAGES = os.environ.get("RNNSERVE_COMPOSE_KEEP_IMAGES") == "1"
REPORT = os.environ.get("RNNSERVE_COMPOSE_REPORT", "")


@dataclass
class Running:
    """The stack once healthy, and what was measured on the way."""

    stack: Stack
    envoy: str  # gRPC address clients use (Envoy's published port)
    prometheus: str  # Prometheus base URL (its published port)
    measured: dict[str, Any]

    def envoy_healthy_hosts(self) -> int:
        admin = f"http://{self.stack.ip('envoy')}:{ENVOY_ADMIN_PORT}"
        status, body = http_get(f"{admin}/clusters")
        lines = body.decode().splitlines() if status == 200 else []
        return sum("::health_flags::healthy" in line for line in lines)

    def wait_all_serving(self) -> None:
        """Every service healthy and both replicas in Envoy's ring."""
        self.stack.wait_healthy(SERVICES, 180)
        wait_until(
            "envoy to route to both replicas",
            lambda: self.envoy_healthy_hosts() == len(REPLICAS),
            60,
        )


@pytest.fixture(scope="module")
def running(
    default_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    repository = default_repository.resolve()
    if not repository.is_relative_to(ROOT):
        pytest.skip(
            f"the image copies its models from the build context; {repository} is outside {ROOT}"
        )
    work = tmp_path_factory.mktemp("compose")
    measured: dict[str, Any] = {}
    started = time.monotonic()
    with docker_engine(work) as engine:
        envoy_port, prometheus_port, grafana_port = free_port(), free_port(), free_port()
        stack = Stack(
            engine,
            PROJECT,
            (COMPOSE_FILE, STANDINS_FILE),
            env={
                "RNNSERVE_BASE_IMAGE": BASE_IMAGE,
                "RNNSERVE_MODEL_REPOSITORY": str(repository.relative_to(ROOT)),
                "RNNSERVE_ENVOY_PORT": str(envoy_port),
                "RNNSERVE_PROMETHEUS_PORT": str(prometheus_port),
                "RNNSERVE_GRAFANA_PORT": str(grafana_port),
            },
        )
        stack.down(remove_images=False)  # what an aborted earlier run may have left
        try:
            measured["docker_daemon_started_here"] = engine.started
            measured["base_image_s"] = round(ensure_base_image(engine), 1)
            measured["extra_ca_certificates"] = stage_ca_certificates()
            t0 = time.monotonic()
            # rnnserve-1 runs the image rnnserve-0 builds (one tag): built once, not twice.
            stack.compose("build", "--parallel", *BUILT, timeout_s=1200)
            measured["build_s"] = round(time.monotonic() - t0, 1)
            images = [BASE_IMAGE, *(stack.image(service) for service in BUILT)]
            measured["image_mb"] = {name: round(engine.image_size(name) / 1e6) for name in images}
            t0 = time.monotonic()
            stack.compose("up", "-d", *SERVICES, timeout_s=300)
            run = Running(
                stack, f"127.0.0.1:{envoy_port}", f"http://127.0.0.1:{prometheus_port}", measured
            )
            run.wait_all_serving()
            measured["up_until_serving_s"] = round(time.monotonic() - t0, 1)
            yield run
        finally:
            with contextlib.suppress(Exception):  # the logs help; the teardown must happen
                for service in SERVICES:
                    (work / f"{service}.log").write_text(stack.logs(service))
            stack.down(remove_images=not KEEP_IMAGES)
            if engine.started and not KEEP_IMAGES:
                # The build stages' images too; the daemon is ours, the base image stays.
                engine.docker_cmd("image", "prune", "--force", check=False)
            measured["total_s"] = round(time.monotonic() - started, 1)
            print(f"\ncompose test measurements: {json.dumps(measured)}  (logs: {work})")
            if REPORT:
                Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
                Path(REPORT).write_text(json.dumps(measured, indent=2) + "\n")


# --- the load ------------------------------------------------------------------------------


async def step_shape(client: AsyncClient) -> tuple[int, ...]:
    """The shape of one timestep of MODEL's input (its per-session shape, time extent 1)."""
    model = await client.get_model(MODEL)
    return tuple(1 if extent < 0 else extent for extent in model.inputs[0].shape)


def session_inputs(index: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The STEPS one-timestep inputs of session ``index``: the same in every run."""
    rng = np.random.default_rng(16_000 + index)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(STEPS)]


@dataclass
class Load:
    """What every session of one run saw."""

    outputs: dict[int, list[np.ndarray]] = field(default_factory=dict)
    positions: dict[int, list[int]] = field(default_factory=dict)
    final_positions: dict[int, int] = field(default_factory=dict)
    lost: dict[int, SessionNotFound] = field(default_factory=dict)
    interrupt_at: int = 0  # steps answered when the interruption started
    interrupt_s: float = 0.0  # how long the interrupting command took
    cancelled: int = 0  # steps sent again after gRPC's CANCELLED
    seconds: float = 0.0


async def step_sessions(
    target: str,
    prefix: str,
    *,
    interrupt: Callable[[], None] | None = None,
    before_load: Callable[[list[str]], None] | None = None,
    tolerate_loss: bool = False,
) -> Load:
    """Open SESSIONS sessions through ``target`` and step each STEPS times, all concurrently;
    run ``interrupt`` (in a thread, the load going on) once INTERRUPT_AFTER of the steps are
    answered. A session answered NOT_FOUND is recorded as lost if ``tolerate_loss``."""
    load = Load()
    total, done = SESSIONS * STEPS, 0
    interrupting: asyncio.Task[None] | None = None
    started = time.monotonic()

    async def timed_interrupt() -> None:
        assert interrupt is not None
        t0 = time.monotonic()
        await asyncio.to_thread(interrupt)
        load.interrupt_s = time.monotonic() - t0

    async with AsyncClient(target, options=OPTIONS) as client:
        shape = await step_shape(client)
        sessions = [
            await client.open_session(MODEL, session_id=f"{prefix}-{index}")
            for index in range(SESSIONS)
        ]
        if before_load is not None:
            await asyncio.to_thread(before_load, [s.session_id for s in sessions])

        async def drive(index: int) -> None:
            nonlocal done, interrupting
            session = sessions[index]
            load.outputs[index], load.positions[index] = [], []
            for x in session_inputs(index, shape):
                try:
                    y = await step(session, x, load)
                except SessionNotFound as error:
                    if not tolerate_loss:
                        raise
                    load.lost[index] = error
                    return
                load.outputs[index].append(y)
                load.positions[index].append(session.position)
                done += 1
                if (
                    interrupt is not None
                    and interrupting is None
                    and done >= INTERRUPT_AFTER * total
                ):
                    load.interrupt_at = done
                    interrupting = asyncio.create_task(timed_interrupt())
                await asyncio.sleep(0)

        await asyncio.gather(*(drive(index) for index in range(SESSIONS)))
        if interrupting is not None:
            await interrupting
        for index, session in enumerate(sessions):
            if index in load.lost:
                continue
            try:
                load.final_positions[index] = (await session.export_state()).position
                await session.close()
            except SessionNotFound as error:
                # Done stepping before the interrupt, on the replica it took away: lost too.
                if not tolerate_loss:
                    raise
                load.lost[index] = error
    load.seconds = time.monotonic() - started
    return load


async def step(session: AsyncSession, x: np.ndarray, load: Load) -> np.ndarray:
    """One step; a CANCELLED while a replica goes away is sent again as it was.

    The SDK retries UNAVAILABLE but not CANCELLED, which a step in flight on a replica that
    stops can also end with. Sending it again is safe: it carries the same expected_position,
    so if the first try was applied the server answers with the stored reply.
    """
    for _ in range(20):
        try:
            return np.asarray(await session.step(x))
        except ServerError as error:
            if error.code != grpc.StatusCode.CANCELLED:
                raise
            load.cancelled += 1
    raise AssertionError(f"{session.session_id}: CANCELLED 20 times")


def assert_matches(load: Load, reference: Load, index: int) -> float:
    """Session ``index`` saw the reference's outputs and positions, as far as it got; the
    largest difference."""
    got, want = load.outputs[index], reference.outputs[index][: len(load.outputs[index])]
    assert load.positions[index] == list(range(1, len(got) + 1)), index
    if not got:
        return 0.0
    np.testing.assert_allclose(
        np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6, err_msg=str(index)
    )
    return float(np.max(np.abs(np.stack(got) - np.stack(want))))


@pytest.fixture(scope="module")
def reference(running: Running) -> Load:
    """The uninterrupted run: every session's outputs with both replicas up throughout."""
    load = asyncio.run(step_sessions(running.envoy, "reference"))
    for index in range(SESSIONS):
        assert load.positions[index] == list(range(1, STEPS + 1)), index
        assert load.final_positions[index] == STEPS, index
    running.measured["uninterrupted_steps_per_s"] = round(SESSIONS * STEPS / load.seconds)
    return load


def holders(running: Running, session_ids: list[str]) -> dict[str, str]:
    """Which replica holds each session resident, from the state store's holder records and
    each replica's id (its ``rnnserve_replica_info`` metric). Not by asking every replica for
    each session: a replica asked for a session another holds calls it back, moving it."""
    import redis

    ids: dict[str, str] = {}
    for replica in REPLICAS:
        try:
            status, body = http_get(f"http://{running.stack.ip(replica)}:9090/metrics")
        except (OSError, ValueError, KeyError):
            continue  # stopped: holds nothing
        found = re.search(r'rnnserve_replica_info\{[^}]*replica="([0-9a-f]+)"', body.decode())
        if status == 200 and found:
            ids[found.group(1)] = replica
    client = redis.Redis(host=running.stack.ip("redis"), port=6379)
    held: dict[str, str] = {}
    for session_id in session_ids:
        key = f"rnnserve:session:anonymous/{session_id}"
        holder = client.get(key + "#holder")
        if holder is not None and not client.exists(key) and holder.decode() in ids:
            held[session_id] = ids[holder.decode()]
    client.close()
    return held


# --- the tests ----------------------------------------------------------------------------


def test_server_image_holds_no_torch_and_serves_the_default_models(running: Running) -> None:
    stack, engine = running.stack, running.stack.engine
    image = stack.image("rnnserve-0")
    probe = (
        "import importlib.util as u; "
        "print(u.find_spec('torch') is None, u.find_spec('rnnserve.server') is not None)"
    )
    out = engine.docker_cmd("run", "--rm", "--entrypoint", "python", image, "-c", probe)
    assert out == "True True", out

    async def listed() -> set[str]:
        async with AsyncClient(running.envoy, options=OPTIONS) as client:
            return {model.name for model in await client.list_models()}

    assert MODEL in asyncio.run(listed())


def test_prometheus_scrapes_both_replicas_with_step_latency(
    running: Running, reference: Load
) -> None:
    prometheus = running.prometheus

    def both_up() -> bool:
        targets = http_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        replicas = [t for t in targets if t["labels"]["job"] == "rnnserve"]
        return len(replicas) == len(REPLICAS) and all(t["health"] == "up" for t in replicas)

    wait_until("prometheus to see both replicas up", both_up, 60)

    def steps_per_replica() -> dict[str, float] | None:
        query = urllib.parse.urlencode(
            {"query": "sum by (replica) (rnnserve_step_latency_seconds_count)"}
        )
        reply = http_json(f"{prometheus}/api/v1/query?{query}")
        assert reply["status"] == "success", reply
        seen = {s["metric"]["replica"]: float(s["value"][1]) for s in reply["data"]["result"]}
        # Every reference step is counted, spread over both replicas.
        ready = set(seen) == set(REPLICAS) and sum(seen.values()) >= SESSIONS * STEPS
        return seen if ready else None

    seen = wait_until("both replicas' step latency in prometheus", steps_per_replica, 60)
    assert all(count > 0 for count in seen.values()), seen
    running.measured["reference_steps_per_replica"] = {k: int(v) for k, v in seen.items()}
    query = urllib.parse.urlencode({"query": "count(rnnserve_step_latency_seconds_bucket)"})
    buckets = http_json(f"{prometheus}/api/v1/query?{query}")["data"]["result"]
    assert buckets and float(buckets[0]["value"][1]) > 0


def test_a_stopped_replica_hands_its_sessions_off_and_nothing_is_lost(
    running: Running, reference: Load
) -> None:
    stack, leaving = running.stack, "rnnserve-1"
    running.wait_all_serving()
    placement: dict[str, str] = {}

    def before_load(session_ids: list[str]) -> None:
        placement.update(holders(running, session_ids))

    def stop() -> None:
        stack.compose("stop", leaving, timeout_s=120)

    load = asyncio.run(
        step_sessions(running.envoy, "stop", interrupt=stop, before_load=before_load)
    )

    on_leaving = sum(holder == leaving for holder in placement.values())
    assert 0 < on_leaving < SESSIONS, f"{on_leaving} of {SESSIONS} sessions on {leaving}"
    assert not load.lost
    worst = max(assert_matches(load, reference, index) for index in range(SESSIONS))
    assert all(
        load.positions[i][-1] == STEPS and load.final_positions[i] == STEPS for i in range(SESSIONS)
    )
    state = stack.inspect(leaving)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0), state
    log = stack.logs(leaving)
    handoff = [line for line in log.splitlines() if "event=handoff " in line]
    assert handoff and "left=0" in handoff[-1], log[-3000:]
    running.measured["stop"] = {
        "sessions_on_stopped_replica": on_leaving,
        "interrupted_after_steps": load.interrupt_at,
        "stop_command_s": round(load.interrupt_s, 1),
        "lost_sessions": 0,
        "steps_resent_after_cancelled": load.cancelled,
        "max_abs_diff_vs_reference": worst,
        "handoff_log": handoff[-1].split("|")[-1].strip(),
    }
    # Back in the ring for what follows.
    stack.compose("start", leaving)
    running.wait_all_serving()


def test_sessions_handed_off_go_on_after_their_replica_comes_back(running: Running) -> None:
    """A rolling restart: stop a replica, step its sessions elsewhere, start it again. Envoy's
    ring then sends the sessions back to the returning replica, which calls each back from the
    replica holding it (a release through Redis): every session steps on, none is lost."""
    stack, leaving = running.stack, "rnnserve-1"
    running.wait_all_serving()
    session_ids = [f"rejoin-{index}" for index in range(20)]

    async def step_each(expected: int) -> None:
        async with AsyncClient(running.envoy, options=OPTIONS) as client:
            x = np.zeros(await step_shape(client), np.float32)
            for session_id in session_ids:
                if expected == 1:
                    session = await client.open_session(MODEL, session_id=session_id)
                else:
                    session = await client.session(session_id)
                await session.step(x)
                assert session.position == expected, session_id

    try:
        asyncio.run(step_each(1))
        moved = [sid for sid, held in holders(running, session_ids).items() if held == leaving]
        assert moved, f"no session on {leaving}"
        stack.compose("stop", leaving, timeout_s=120)
        asyncio.run(step_each(2))  # taken from Redis by the other replica
    except SessionNotFound as error:
        raise AssertionError(f"lost before the replica came back: {error}") from error
    stack.compose("start", leaving)
    running.wait_all_serving()
    asyncio.run(step_each(3))


def test_a_killed_replica_loses_at_most_its_resident_sessions_and_never_a_wrong_output(
    running: Running, reference: Load
) -> None:
    stack, victim = running.stack, "rnnserve-0"
    running.wait_all_serving()
    placement: dict[str, str] = {}

    def before_load(session_ids: list[str]) -> None:
        placement.update(holders(running, session_ids))

    def kill() -> None:
        stack.engine.docker_cmd("kill", stack.container(victim))

    load = asyncio.run(
        step_sessions(
            running.envoy, "kill", interrupt=kill, before_load=before_load, tolerate_loss=True
        )
    )

    resident = {int(sid.rsplit("-", 1)[1]) for sid, holder in placement.items() if holder == victim}
    assert 0 < len(resident) < SESSIONS, f"{len(resident)} of {SESSIONS} sessions on {victim}"
    # Only sessions the killed replica held may be lost, and a lost one said so (NOT_FOUND).
    assert set(load.lost) <= resident, sorted(set(load.lost) - resident)
    worst = max(assert_matches(load, reference, index) for index in range(SESSIONS))
    for index in set(range(SESSIONS)) - set(load.lost):
        assert load.positions[index] == list(range(1, STEPS + 1)), index
        assert load.final_positions[index] == STEPS, index
    state = stack.inspect(victim)["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 137, state
    running.measured["kill"] = {
        "sessions_on_killed_replica": len(resident),
        "interrupted_after_steps": load.interrupt_at,
        "lost_sessions": len(load.lost),
        "steps_resent_after_cancelled": load.cancelled,
        "lost_reasons": sorted({error.reason for error in load.lost.values()}),
        "completed_sessions": SESSIONS - len(load.lost),
        "max_abs_diff_vs_reference": worst,
    }
