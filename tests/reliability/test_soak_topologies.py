"""The soak over the server's shapes: several frontends, parking, two replicas and a drain.

The same exact-output check as ``test_soak.py`` (every output, exported state and fork
compared with onnxruntime run directly; any cross-talk is a wrong number), driven by
:mod:`.soak_mixed`: every lane mixes unary Steps, streams of its own, multiplexed streams,
resets, forks, exports, reopenings from exported state, moves to a new model version and
retried steps (after the reply came, after it was lost), while version 2 is loaded and
version 1 retired through the AdminService mid-run. Configurations:

- ``mixed``: one server process, no state store: the operations alone;
- ``frontends2``: ``--frontends 2`` (two frontend processes feeding one engine);
- ``parking``: a Redis state store and ``--park-after-s 0.2``; lanes take turns to be idle
  for a reaper round, so each parks and comes back many times between its steps;
- ``two_replicas``: two servers sharing one Redis; every call of a lane goes to the other
  replica than its last (the session is called back across), and one replica is drained
  (SIGTERM) mid-round: its sessions hand off through Redis, the lanes go on through the other.
  A live session is never NOT_FOUND right after it moved (``soak_mixed.HOLDER_RACE`` off;
  ``tests/scaleout/test_holder_record_race.py``).

Every configuration also checks what is left at the end: no open or parked session, no
session in the store, version 1 released and version 2 serving, and server RSS growing
less than 5 % after warm-up.

Default sizes run in seconds each. ``--runslow`` or ``RNNSERVE_SOAK=full``: the full sizes,
whose figures are written to ``tests/reliability/SOAK_RESULTS.md`` (a section each).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from deploy.tools import free_port
from scaleout.redis_server import RedisServer, left_behind

from .harness import MODEL, ServerProcess, build_repository
from .soak_lanes import Reference, check_lane
from .soak_mixed import Config, MixedSoak, Replica

RESULTS = Path(__file__).with_name("SOAK_RESULTS.md")
PHASE_S = 1.3  # parking: a phase spans a reaper round (1 s) after park_after_s (0.2 s)
PHASE_ROUNDS = 3
PARK_AFTER_S = "0.2"


@dataclass(frozen=True)
class Topology:
    replicas: int = 1
    frontends: int = 1
    store: bool = False
    park_after_s: str | None = None
    alternate: bool = False
    drain: bool = False
    lanes: int = 32
    rounds: int = 30
    full_lanes: int = 400
    full_rounds: int = 200


TOPOLOGIES = {
    "mixed": Topology(),
    "frontends2": Topology(frontends=2),
    "parking": Topology(store=True, park_after_s=PARK_AFTER_S, rounds=24, full_rounds=90),
    "two_replicas": Topology(
        replicas=2,
        store=True,
        alternate=True,
        drain=True,
        lanes=24,
        rounds=24,
        full_lanes=200,
        full_rounds=120,
    ),  # fmt: skip
}


def _full(config: pytest.Config) -> bool:
    return bool(config.getoption("--runslow")) or os.environ.get("RNNSERVE_SOAK") == "full"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), free_port()) as server:
        yield server


def _rss(server: ServerProcess) -> int:
    """RSS of the server's processes: the engine and its frontend processes."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _frontend_cpu_s(server: ServerProcess) -> list[float]:
    """CPU seconds of each frontend process (the engine's multiprocessing children)."""
    assert server.process is not None
    found = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                times = child.cpu_times()
                found.append(times.user + times.system)
        except psutil.NoSuchProcess:
            pass
    return found


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


async def _soak(
    name: str,
    topology: Topology,
    lanes: int,
    rounds: int,
    tmp_path: Path,
    redis: RedisServer | None,
) -> dict:
    repository = build_repository(tmp_path / "repository", max_sessions=2 * lanes + 64)
    args = ["--max-message-bytes", str(8 << 20), "--grace-s", "5"]
    args += ["--frontends", str(topology.frontends)]
    prefix = f"soak-{name}-{time.monotonic_ns()}:"
    if topology.store:
        assert redis is not None
        args += ["--state-store", redis.url, "--state-store-prefix", prefix]
    if topology.park_after_s is not None:
        args += ["--park-after-s", topology.park_after_s]
    replicas = []
    for n in range(topology.replicas):
        server = ServerProcess(repository, *args, log_path=tmp_path / f"server-{n}.log")
        replicas.append(Replica("ab"[n], server))
    config = Config(alternate=topology.alternate, transient_ok=topology.drain, store=topology.store)
    soak = MixedSoak(replicas, repository, config)
    load_at, retire_at, drain_at = int(rounds * 0.3), int(rounds * 0.55), int(rounds * 0.7)
    rss: dict[str, list[int]] = {r.name: [] for r in replicas}
    warm_at = load_at + 2
    result: dict = {"stats": soak.stats}
    started = time.monotonic()
    try:
        for replica in replicas:
            replica.server.start()
            await replica.connect()
        cpu_at_start = _frontend_cpu_s(replicas[0].server) if topology.frontends > 1 else []
        await soak.open_lanes(lanes)
        phase_started = time.monotonic()
        for r in range(rounds):
            if r == load_at:
                await soak.load_version("2")
            if r == retire_at:
                await soak.retire_version("1")
            active = soak.lanes
            if topology.park_after_s is not None:
                parity = (r // PHASE_ROUNDS) % 2
                active = [lane for lane in soak.lanes if lane.index % 2 == parity]
            if topology.drain and r == drain_at:
                leaving = replicas[0]
                result["releases before the drain"] = leaving.server.metric(
                    "rnnserve_parks_total", trigger="release"
                )
                await asyncio.gather(soak.round(active), _drain(leaving))
                assert leaving.server.process is not None
                code = await asyncio.to_thread(leaving.server.process.wait, 60)
                leaving.alive = False
                handed = re.search(
                    r"event=handoff store=\S+ sessions=(\d+) left=(\d+)", leaving.server.stderr()
                )
                assert code == 0 and handed is not None, leaving.server.stderr()[-3000:]
                result["handed off"] = int(handed.group(1))
                result["left behind"] = int(handed.group(2))
            else:
                await soak.round(active)
            for replica in replicas:
                if replica.alive and r >= warm_at:
                    rss[replica.name].append(_rss(replica.server))
            if topology.park_after_s is not None and r % PHASE_ROUNDS == PHASE_ROUNDS - 1:
                await asyncio.sleep(max(0.0, phase_started + PHASE_S - time.monotonic()))
                phase_started = time.monotonic()
        await soak.finish()
        result["elapsed"] = time.monotonic() - started
        staying = [r for r in replicas if r.alive]
        for replica in staying:
            server = replica.server
            result[f"{replica.name} active"] = server.metric(
                "rnnserve_active_sessions", model=MODEL
            )
            result[f"{replica.name} parked"] = server.metric("rnnserve_parked_sessions")
            result[f"{replica.name} unparks"] = server.metric("rnnserve_unparks_total")
            for trigger in ("idle", "release", "full"):
                result[f"{replica.name} parks {trigger}"] = server.metric(
                    "rnnserve_parks_total", trigger=trigger
                )
            result[f"{replica.name} versions"] = await _versions_settled(soak, replica)
        if topology.frontends > 1:  # CPU each frontend process spent serving the soak
            cpu = _frontend_cpu_s(replicas[0].server)
            result["frontend cpu"] = [b - a for a, b in zip(cpu_at_start, cpu, strict=True)]
        if redis is not None:
            result["store keys left"] = left_behind(redis.client(), prefix + "*")
    finally:
        for replica in replicas:
            await replica.close()
            replica.server.stop()
    reference = Reference(repository)
    wrong = [w for lane in soak.lanes for w in check_lane(lane, reference)]
    result.update(
        soak=soak,
        wrong=wrong,
        rss=rss,
        unary_p50=_percentile(soak.latency["unary"], 0.5),
        unary_p99=_percentile(soak.latency["unary"], 0.99),
        mux_p50=_percentile(soak.latency["mux"], 0.5),
        mux_p99=_percentile(soak.latency["mux"], 0.99),
    )
    return result


async def _drain(replica: Replica) -> None:
    """SIGTERM a replica while the round's calls are in flight."""
    await asyncio.sleep(0.05)
    replica.draining = True
    replica.server.signal(signal.SIGTERM)


async def _versions_settled(soak: MixedSoak, replica: Replica) -> dict[str, str]:
    """The model's versions once version 1 (retired, no session left) is released."""
    deadline = time.monotonic() + 10
    while True:
        states = await soak.version_states(replica)
        if states.get("1") != "RETIRING" or time.monotonic() > deadline:
            return states
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("name", list(TOPOLOGIES))
async def test_soak_topology(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    topology = TOPOLOGIES[name]
    full = _full(request.config)
    lanes, rounds = (
        (topology.full_lanes, topology.full_rounds) if full else (topology.lanes, topology.rounds)
    )
    redis = request.getfixturevalue("redis_server") if topology.store else None
    result = await _soak(name, topology, lanes, rounds, tmp_path, redis)
    soak: MixedSoak = result["soak"]
    stats = soak.stats
    staying = [r for r in ("a", "b") if f"{r} active" in result]
    rss = result["rss"][staying[0]]
    growth = rss[-1] / rss[0] - 1 if len(rss) >= 2 else 0.0
    summary = _summary(name, lanes, rounds, result, rss, growth)
    print(summary)
    if soak.errors:
        print(soak.traces())
    assert not soak.errors, f"{len(soak.errors)} errors, first: {soak.errors[:10]}"
    assert not result["wrong"], f"{len(result['wrong'])} wrong numbers: {result['wrong'][:10]}"
    # Every kind of action ran, on every lane's mix.
    for kind in ("mux", "unary", "single", "retry", "lost", "reset", "fork", "export", "reopen"):
        assert stats[f"action {kind}"] > 0, kind
    assert stats["moves"] > 0 and stats["forks closed by close_sessions_on_end"] > 0
    if not topology.store:  # with a store, every lane left version 1 before it retired
        assert stats["forks refused (version retiring)"] > 0
    for r in staying:
        assert result[f"{r} active"] == 0 and result[f"{r} parked"] == 0
        assert result[f"{r} versions"] == {"1": "RETIRED", "2": "READY"}, result[f"{r} versions"]
    if topology.store:
        assert result["store keys left"] == []
    if topology.park_after_s is not None:
        # Each lane idled through a reaper round every other phase: many parks, all back.
        assert result["a parks idle"] >= lanes, result["a parks idle"]
        assert result["a unparks"] >= result["a parks idle"] * 0.9
    if topology.drain:
        assert result["handed off"] > 0 and result["left behind"] == 0
        assert result["releases before the drain"] > 0  # sessions were called back across
        assert result["b unparks"] > 0
    if topology.frontends > 1:  # the connections were spread over every frontend process
        cpu = result["frontend cpu"]
        assert len(cpu) == topology.frontends and min(cpu) > 0.05, cpu
    assert growth < 0.05, f"server RSS grew {growth:.1%} after warm-up"
    if full:
        _write_result(name, summary)


def _summary(
    name: str, lanes: int, rounds: int, result: dict, rss: list[int], growth: float
) -> str:
    stats = dict(result["stats"])
    soak: MixedSoak = result["soak"]
    steps, timesteps = stats.pop("steps", 0), stats.pop("timesteps", 0)
    extra = {k: v for k, v in result.items() if k.endswith(("parks idle", "parks release"))}
    extra.update({k: v for k, v in result.items() if k.endswith("unparks")})
    for key in ("handed off", "releases before the drain"):
        if key in result:
            extra[key] = result[key]
    if "frontend cpu" in result:
        extra["frontend cpu s"] = [round(c, 1) for c in result["frontend cpu"]]
    rss = rss or [0]
    return (
        f"{name}: {lanes} lanes x {rounds} rounds ({steps} step calls, {timesteps} timesteps) "
        f"in {result['elapsed']:.1f} s; {dict(sorted(stats.items()))}; {extra}; "
        f"{len(soak.errors)} errors; {len(result['wrong'])} cross-talk; unary Step latency "
        f"p50 {result['unary_p50']:.2f} ms, p99 {result['unary_p99']:.2f} ms; multiplexed "
        f"stream round p50 {result['mux_p50']:.2f} ms, p99 {result['mux_p99']:.2f} ms; RSS "
        f"after warm-up {rss[0] / 2**20:.1f} MiB, end {rss[-1] / 2**20:.1f} MiB ({growth:+.2%})"
    )


def _write_result(name: str, summary: str) -> None:
    """Replace (or add) this configuration's section of SOAK_RESULTS.md."""
    title = f"## Topology soak: {name} (last full run)"
    run = (
        f"Run: `RNNSERVE_SOAK=full pytest tests/reliability/test_soak_topologies.py -s "
        f"-k {name}` on {os.cpu_count()} CPU cores, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )
    section = f"{title}\n\n{run}\n\n{summary}\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# Soak results (last full run)\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
