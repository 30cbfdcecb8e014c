"""One benchmark run: rnnserve beside its floors, on the same model, messages and client code.

Every ratio the targets judge compares two figures measured side by side: each rnnserve
point right after the same point on the bare echo server (both servers up at once), the
engine floor right after onnxruntime alone, the SDK's sync client right after the aio load
it is judged against, one frontend count after another. Each pair is measured
``rounds`` times, alternating, and each side keeps its best round (:class:`Rounds`), so a
burst of other work on a shared machine lands in one round instead of in one side. The
order is fixed so results are comparable across runs: latency, session sweep, coalesced,
SDK, batching off, chunks, the floors, a profile, then memory last (the sessions it opens
stay open until the server stops), then the frontend counts.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import floors, memory, model, profile
from .load import LoadResult, LoadSpec, run_load
from .processes import echo_server, rnnserve_server

LATENCY_QUANTILES = np.linspace(0.0, 1.0, 201)


@dataclass(frozen=True)
class BenchConfig:
    """What to run and for how long; ``quick`` keeps the whole run under a minute."""

    repository: Path | None = None  # None: build the default model into a temporary repository
    model: str = model.BATCHED
    unbatched_model: str | None = None  # batching-off copy; built for the default model
    quick: bool = False
    client_procs: int = 1
    warmup_s: float = 1.0
    duration_s: float = 4.0
    sessions: tuple[int, ...] = (1, 16, 64, 256, 1024)
    echo_streams: tuple[int, ...] = (1, 16, 64, 256, 1024)  # the floor at every sweep point
    chunks: tuple[int, ...] = (1, 8, 32)
    memory_sessions: tuple[int, ...] = (10_000, 100_000)
    profile: bool = True
    frontends: tuple[int, ...] = (1, 2)  # --frontends values compared on the stream sweep
    #: Connections per load process when frontend counts are compared (each count measured
    #: with as many): SO_REUSEPORT spreads connections, so one connection reaches one frontend.
    frontend_channels: int = 16
    sync_threads: int = 64
    #: Alternating rounds of each side-by-side pair; each side keeps its best round.
    rounds: int = 2
    device: str = "auto"  # rnnserve serve --device, and the floors' provider
    tf32: bool = False  # rnnserve serve --tf32, and the floors' CUDA provider alike
    max_batch: int = 256  # max_batch_size of the built bench model
    log: Callable[[str], None] = print
    notes: dict[str, str] = field(default_factory=dict)

    @classmethod
    def quick_config(cls, **overrides: Any) -> BenchConfig:
        base = dict(
            quick=True,
            warmup_s=0.2,
            duration_s=0.6,
            memory_sessions=(2_000,),
            profile=False,
            rounds=1,
        )
        return cls(**{**base, **overrides})

    def device_args(self) -> list[str]:
        """The ``rnnserve serve`` flags that choose where the model runs."""
        return ["--device", self.device, *(["--tf32"] if self.tf32 else [])]


def summarise(result: LoadResult) -> dict[str, Any]:
    """Rates and latency percentiles of one load run (seconds)."""
    lat = np.asarray(result.latencies_s, dtype=np.float64)
    window = result.window_s or 1.0
    out: dict[str, Any] = {
        "steps_per_s": result.steps / window,
        "messages_per_s": result.messages / window,
        "errors": result.errors,
        "samples": int(lat.size),
    }
    if lat.size:
        out |= {
            "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)),
            "mean_s": float(lat.mean()),
        }
    if result.first_error:
        out["first_error"] = result.first_error
    return out


def _cdf(result: LoadResult) -> list[float]:
    lat = np.asarray(result.latencies_s, dtype=np.float64)
    return np.quantile(lat, LATENCY_QUANTILES).tolist() if lat.size else []


@dataclass
class Rounds:
    """The rounds of one measurement point, each measured beside its baseline's.

    The figure kept is the round with the most steps/s (at one session, closed loop: the
    lowest mean latency), for a floor and for rnnserve alike: on a shared machine a slower
    round is the machine's other work, which either side may meet. Every round's steps/s is
    kept beside it, so the spread shows.
    """

    runs: list[LoadResult] = field(default_factory=list)

    @property
    def best(self) -> LoadResult:
        return max(self.runs, key=lambda r: r.steps / (r.window_s or 1.0))

    def summary(self) -> dict[str, Any]:
        out = summarise(self.best)
        out["rounds_steps_per_s"] = [summarise(r)["steps_per_s"] for r in self.runs]
        return out

    def cdf(self) -> list[float]:
        return _cdf(self.best)


def fastest(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per batch size, the round of a floor (``{"step_s", "steps_per_s"}`` per batch) that
    took least time per run, with every round's steps/s beside it."""
    out: dict[str, dict[str, float | list[float]]] = {}
    for batch in rounds[0]:
        kept = min((r[batch] for r in rounds), key=lambda v: v["step_s"])
        out[batch] = {**kept, "rounds_steps_per_s": [r[batch]["steps_per_s"] for r in rounds]}
    return out  # type: ignore[return-value]


def machine() -> dict[str, Any]:
    """CPU model, cores and versions, so a result file says where it came from."""
    import grpc
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def run(config: BenchConfig) -> dict[str, Any]:
    """Run every section and return the result document (not yet written)."""
    log = config.log
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-") as tmp:
        work = Path(tmp)
        # memory runs keep their sessions open, one after another
        max_sessions = sum(config.memory_sessions) + 64 * len(config.memory_sessions)
        max_sessions += max(config.sessions) + 2048
        if config.repository is None:
            repository = work / "repository"
            shape = model.write_repository(
                repository, max_sessions=max_sessions, max_batch=config.max_batch
            )
            unbatched: str | None = model.UNBATCHED
        else:
            repository = config.repository
            shape = model.read_shape(repository / config.model)
            unbatched = config.unbatched_model
        model_dir = repository / config.model

        def feeds(batch: int, timesteps: int) -> dict[str, np.ndarray]:
            return model.graph_feeds(model_dir, batch, timesteps)

        # a user's model may hold fewer sessions than the sweep asks for: measure what fits
        room = shape.max_sessions - 16
        sessions = tuple(n for n in config.sessions if n <= room)
        share = room // (2 * len(config.memory_sessions))
        memory_sessions = tuple(min(n, share) for n in config.memory_sessions)
        versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
        onnx_path = model_dir / str(versions[-1]) / "model.onnx"

        doc: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quick": config.quick,
            "machine": machine(),
            "model": {
                "name": config.model,
                "path": str(onnx_path),
                "inputs": shape.inputs,
                "outputs": shape.outputs,
                "state_bytes": shape.state_bytes,
            },
            "load": {
                "client_procs": config.client_procs,
                "warmup_s": config.warmup_s,
                "duration_s": config.duration_s,
                "client": "raw grpc.aio stubs, closed loop, in spawned load processes",
            },
            "notes": dict(config.notes),
        }

        def measure(
            address: str, name: str, mode: str, sessions: int, k: int = 1, channels: int = 1
        ) -> LoadResult:
            spec = LoadSpec(
                address,
                name,
                mode,
                sessions,
                k,
                shape.inputs,
                config.warmup_s,
                config.duration_s,
                channels=channels,
            )
            procs = 1 if mode == "coalesced" else config.client_procs
            result = run_load(spec, procs)
            s = summarise(result)
            log(
                f"  {name:>20} {mode:>9} n={sessions:<5} K={k:<3} "
                f"{s['steps_per_s']:>10.0f} steps/s  p50 {1e3 * s.get('p50_s', 0):.3f} ms"
                + (f"  errors={result.errors} {result.first_error[:120]}" if result.errors else "")
            )
            return result

        def side_by_side(*runs: Callable[[], LoadResult]) -> list[Rounds]:
            """Each of ``runs`` ``config.rounds`` times, alternating."""
            rounds = [Rounds() for _ in runs]
            for _ in range(config.rounds):
                for measured, one in zip(rounds, runs, strict=True):
                    measured.runs.append(one())
            return rounds

        transport: dict[str, Any] = {"step": {}, "stream": {}, "coalesced": {}}
        served: dict[str, Any] = {
            "latency": {},
            "throughput": {"stream": {}, "coalesced": {}, "step": {}},
            "batching": {},
            "chunks": {},
        }
        cdfs: dict[str, list[float]] = {}
        first_frontends = str(config.frontends[0])
        with rnnserve_server(
            repository, "--frontends", first_frontends, *config.device_args()
        ) as server:
            log(
                "rnnserve beside the transport floor (bare grpc.aio echo, same messages), "
                f"{config.rounds} alternating round(s) each, best kept"
            )
            with echo_server(shape.outputs, work) as echo:

                def beside_echo(mode: str, n: int) -> tuple[Rounds, Rounds]:
                    floor, ours = side_by_side(
                        lambda: measure(echo.address, config.model, mode, n),
                        lambda: measure(server.address, config.model, mode, n),
                    )
                    transport[mode][str(n)] = floor.summary()
                    return floor, ours

                def echo_alone(mode: str, n: int) -> None:
                    """A floor point rnnserve does not reach (more sessions than it holds)."""
                    (floor,) = side_by_side(lambda: measure(echo.address, config.model, mode, n))
                    transport[mode][str(n)] = floor.summary()

                floor, ours = beside_echo("step", 1)
                cdfs["echo Step"], cdfs["rnnserve Step"] = floor.cdf(), ours.cdf()
                served["latency"]["step"] = ours.summary()
                _, ours = beside_echo("step", 64)
                served["throughput"]["step"]["64"] = ours.summary()
                for n in sorted(set(config.echo_streams) | set(sessions)):
                    if n not in sessions:
                        echo_alone("stream", n)
                        continue
                    floor, ours = beside_echo("stream", n)
                    served["throughput"]["stream"][str(n)] = ours.summary()
                    if n == 1:
                        served["latency"]["stream"] = ours.summary()
                        cdfs["echo StreamSteps"] = floor.cdf()
                        cdfs["rnnserve StreamSteps"] = ours.cdf()
                    if n == 256:
                        cdfs["rnnserve StreamSteps, 256 sessions"] = ours.cdf()
                for n in (256, 1024):
                    if n <= room:
                        _, ours = beside_echo("coalesced", n)
                        served["throughput"]["coalesced"][str(n)] = ours.summary()
                    else:
                        echo_alone("coalesced", n)
            doc["transport_floor"] = transport

            log(f"  SDK sync client, {config.sync_threads} threads, beside the aio Step load")
            sync_rounds: list[dict[str, Any]] = []
            step_rounds = Rounds()
            for _ in range(config.rounds):
                step_rounds.runs.append(measure(server.address, config.model, "step", 64))
                sync_rounds.append(
                    floors.sync_client_steps(
                        server.address,
                        config.model,
                        config.sync_threads,
                        shape.inputs,
                        0.6 if config.quick else config.duration_s,
                    )
                )
                log(f"    {sync_rounds[-1]['steps_per_s']:.0f} steps/s")
            served["sync_client"] = max(sync_rounds, key=lambda s: s["steps_per_s"])
            served["sync_client"]["rounds_steps_per_s"] = [s["steps_per_s"] for s in sync_rounds]
            served["sync_client"]["aio_step"] = step_rounds.summary()

            on_off = [lambda: measure(server.address, config.model, "coalesced", 256)]
            if unbatched:
                on_off.append(lambda: measure(server.address, unbatched, "coalesced", 256))
            batching = side_by_side(*on_off)
            served["batching"]["on"] = batching[0].summary()
            if unbatched:
                served["batching"]["off"] = batching[1].summary()
            chunk_runs = side_by_side(
                *(
                    (lambda k=k: measure(server.address, config.model, "step", 1, k))
                    for k in config.chunks
                )
            )
            for k, r in zip(config.chunks, chunk_runs, strict=True):
                s = r.summary()
                s["timesteps_per_s"] = s["steps_per_s"] * k
                served["chunks"][str(k)] = s

            log(
                "model floor (onnxruntime alone) beside the engine floor (the engine alone, "
                "fed in-process), alternating, best kept"
            )
            floor_batches = tuple(
                sorted({1, 64, 256} | {n for n in sessions if n <= config.max_batch})
            )
            state_inputs = tuple(model.state_inputs(model_dir))
            floor_s = 0.3 if config.quick else 1.5
            model_rounds: list[dict[str, dict[str, float]]] = []
            engine_rounds: list[dict[str, dict[str, float]]] = []
            chunk_rounds: list[dict[str, float]] = []
            for _ in range(config.rounds):
                timed, providers = floors.model_floor(
                    onnx_path,
                    feeds,
                    floor_batches,
                    duration_s=floor_s,
                    device=config.device,
                    state_inputs=state_inputs,
                    tf32=config.tf32,
                )
                model_rounds.append(timed)
                engine_rounds.append(
                    floors.engine_floor(
                        repository,
                        config.model,
                        (64, 256),
                        duration_s=floor_s,
                        device=config.device,
                        tf32=config.tf32,
                    )
                )
                chunk_rounds.append(
                    {
                        str(k): floors.model_floor(
                            onnx_path,
                            feeds,
                            (1,),
                            duration_s=0.3 if config.quick else 1.0,
                            timesteps=k,
                            device=config.device,
                            state_inputs=state_inputs,
                            tf32=config.tf32,
                        )[0]["1"]["step_s"]
                        for k in config.chunks
                    }
                )
            doc["model_floor"] = fastest(model_rounds)
            doc["engine_floor"] = fastest(engine_rounds)
            doc["model_floor_chunks_s"] = {
                str(k): min(r[str(k)] for r in chunk_rounds) for k in config.chunks
            }
            doc["provider"] = providers
            doc["device"] = config.device
            for b, v in doc["model_floor"].items():
                log(f"  onnxruntime batch {b:>4}: {1e6 * v['step_s']:.1f} µs/run")
            for b, v in doc["engine_floor"].items():
                log(f"  engine      batch {b:>4}: {1e6 * v['step_s']:.1f} µs/round")
            for k, v in doc["model_floor_chunks_s"].items():
                log(f"  onnxruntime batch 1, K={k:>2}: {1e6 * v:.1f} µs/run")

            if config.profile:
                doc["profile"] = _profile(server.address, server.pid, config, shape, work, log)
            log("memory per open session")
            served["memory"] = {}
            for n in memory_sessions:
                m = memory.session_memory(server.address, config.model, server.pid, n, shape.inputs)
                served["memory"][str(n)] = m
                log(
                    f"  {n} sessions: {m['rss_per_session_bytes']:.0f} B/session open, "
                    f"{m['rss_per_session_after_one_step_bytes']:.0f} B after one step "
                    f"({m['open_per_s']:.0f} opens/s)"
                )
        log(
            "frontends (--frontends N, StreamSteps one step per message, "
            f"{config.frontend_channels} connections per load process), alternating rounds"
        )
        front_rounds: dict[str, dict[str, Rounds]] = {str(count): {} for count in config.frontends}
        for _ in range(config.rounds):
            for count in config.frontends:
                with rnnserve_server(
                    repository, "--frontends", str(count), *config.device_args()
                ) as server:
                    for n in (64, 256):
                        if n in sessions:
                            front_rounds[str(count)].setdefault(str(n), Rounds()).runs.append(
                                measure(
                                    server.address,
                                    config.model,
                                    "stream",
                                    n,
                                    channels=config.frontend_channels,
                                )
                            )
        served["frontends"] = {
            count: {n: rounds.summary() for n, rounds in points.items()}
            for count, points in front_rounds.items()
        }
        doc["rnnserve"] = served
        doc["latency_cdf"] = {"quantiles": LATENCY_QUANTILES.tolist(), "series": cdfs}
        doc["targets"] = targets(doc)
        doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return doc


def _profile(address, pid, config, shape, work, log) -> dict[str, Any]:
    """py-spy samples of the server under two loads: one session, and 256 coalesced."""
    out: dict[str, Any] = {}
    if profile.py_spy() is None:
        return {"skipped": "py-spy is not installed"}
    for label, mode, n in (
        ("stream_1_session", "stream", 1),
        ("stream_256_sessions", "stream", 256),
        ("coalesced_256_sessions", "coalesced", 256),
    ):
        raw = work / f"profile-{label}.txt"
        spec = LoadSpec(address, config.model, mode, n, 1, shape.inputs, 2.0, 3.0)
        recorder = profile.start(pid, 7.0, raw)
        run_load(spec, 1 if mode == "coalesced" else config.client_procs)
        if recorder is not None:
            _, err = recorder.communicate(timeout=60)
            if raw.exists():
                out[label] = profile.summarise(raw)
                top = out[label]["self"][:3]
                log(
                    f"  profile {label}: "
                    + "; ".join(f"{t['share']:.0%} {t['frame'][:60]}" for t in top)
                )
            else:
                out[label] = {"error": err.decode(errors="replace")[-500:]}
    return out


def _ratio(value: float, floor: float) -> float:
    return value / floor if floor else float("nan")


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets as ratios from this run, each with its limit and pass/fail."""
    t, m, s = doc["transport_floor"], doc["model_floor"], doc["rnnserve"]
    ort1 = m["1"]["step_s"]
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, at_most: bool, detail: str) -> None:
        ok = value <= limit if at_most else value >= limit
        rows.append(
            {
                "target": name,
                "value": value,
                "limit": limit,
                "direction": "<=" if at_most else ">=",
                "met": bool(ok),
                "detail": detail,
            }
        )

    for mode, label in (("step", "Step"), ("stream", "StreamSteps")):
        echo_p50 = t[mode]["1"]["p50_s"]
        p50 = s["latency"][mode]["p50_s"]
        add(
            f"single-session p50 latency / (echo p50 + ORT b1), {label}",
            _ratio(p50, echo_p50 + ort1),
            1.3,
            True,
            f"{1e6 * p50:.0f} µs vs {1e6 * echo_p50:.0f} + {1e6 * ort1:.0f} µs",
        )
    stream = s["throughput"]["stream"]
    for n in ("64", "256"):
        if n in stream and n in t["stream"]:
            v, echo = stream[n]["steps_per_s"], t["stream"][n]["messages_per_s"]
            add(
                f"StreamSteps steps/s at {n} sessions (one step per message) / echo msgs/s",
                _ratio(v, echo),
                0.8,
                False,
                f"{v:.0f} vs {echo:.0f}",
            )
    sweep = [n for n in ("64", "256", "1024") if n in stream]
    if len(sweep) > 1:
        falls = min(
            _ratio(stream[b]["steps_per_s"], stream[a]["steps_per_s"])
            for a, b in zip(sweep, sweep[1:], strict=False)
        )
        add(
            "StreamSteps steps/s, smallest ratio of one sweep point to the one before (64 → 1024)",
            falls,
            1.0,
            False,
            ", ".join(f"{n}: {stream[n]['steps_per_s']:.0f}" for n in sweep)
            + (  # the echo floor over the same sweep: what gRPC alone does as streams grow
                " (echo: "
                + ", ".join(f"{t['stream'][n]['messages_per_s']:.0f}" for n in sweep)
                + ")"
                if all(n in t["stream"] for n in sweep)
                else ""
            ),
        )
    if "64" in s["throughput"].get("step", {}) and "64" in t["step"]:
        v, echo = s["throughput"]["step"]["64"]["steps_per_s"], t["step"]["64"]["messages_per_s"]
        add(
            "Step (unary) steps/s at 64 sessions / unary echo calls/s at 64",
            _ratio(v, echo),
            0.8,
            False,
            f"{v:.0f} vs {echo:.0f}",
        )
    if "256" in s["throughput"]["coalesced"] and "256" in m:
        v, ort = s["throughput"]["coalesced"]["256"]["steps_per_s"], m["256"]["steps_per_s"]
        add(
            "coalesced steps/s at 256 sessions / onnxruntime batch-256 steps/s",
            _ratio(v, ort),
            0.4,
            False,
            f"{v:.0f} vs {ort:.0f}",
        )
    for b, v in doc.get("engine_floor", {}).items():
        if b in m:
            add(
                f"engine alone, batch {b} / onnxruntime alone, batch {b} (steps/s)",
                _ratio(v["steps_per_s"], m[b]["steps_per_s"]),
                0.8,
                False,
                f"{v['steps_per_s']:.0f} vs {m[b]['steps_per_s']:.0f}",
            )
    fronts = s.get("frontends", {})
    if len(fronts) > 1:
        counts = sorted(fronts, key=int)
        base = fronts[counts[0]]
        for count in counts[1:]:
            for n in ("256",):
                if n in base and n in fronts[count]:
                    a, b = base[n]["steps_per_s"], fronts[count][n]["steps_per_s"]
                    add(
                        f"StreamSteps at {n} sessions, {count} frontends / {counts[0]}",
                        _ratio(b, a),
                        1.0,
                        False,
                        f"{b:.0f} vs {a:.0f} steps/s",
                    )
    if "sync_client" in s:
        v, aio = s["sync_client"]["steps_per_s"], s["sync_client"]["aio_step"]["steps_per_s"]
        add(
            f"SDK sync client, {s['sync_client']['threads']} threads / aio Step load at 64",
            _ratio(v, aio),
            0.7,
            False,
            f"{v:.0f} vs {aio:.0f}",
        )
    if "off" in s["batching"]:
        on, off = s["batching"]["on"]["steps_per_s"], s["batching"]["off"]["steps_per_s"]
        add(
            "batching on / off at 256 sessions (steps/s)",
            _ratio(on, off),
            3.0,
            False,
            f"{on:.0f} vs {off:.0f}",
        )
    k1, k32 = s["chunks"]["1"]["timesteps_per_s"], s["chunks"]["32"]["timesteps_per_s"]
    if "model_floor_chunks_s" in doc:
        echo_p50 = t["step"]["1"]["p50_s"]
        ceiling = (
            32
            * (echo_p50 + doc["model_floor_chunks_s"]["1"])
            / (echo_p50 + doc["model_floor_chunks_s"]["32"])
        )
        rows_note = f", floors allow {ceiling:.1f}x"
    else:
        rows_note = ""
    add(
        "chunk K=32 / K=1 timesteps/s, one session",
        _ratio(k32, k1),
        20.0,
        False,
        f"{k32:.0f} vs {k1:.0f}{rows_note}",
    )
    limit = 1.2 * doc["model"]["state_bytes"] + 2048
    for n, mem in s["memory"].items():
        per = mem["rss_per_session_bytes"]
        add(
            f"RSS per open session ({n} sessions) / (1.2 x state + 2 KiB)",
            _ratio(per, limit),
            1.0,
            True,
            f"{per:.0f} B vs limit {limit:.0f} B (state {doc['model']['state_bytes']} B)",
        )
        stepped = mem.get("rss_per_session_after_one_step_bytes")
        if stepped is not None:
            add(
                f"RSS per session after one step ({n}) / (1.2 x state + 2 KiB)",
                _ratio(stepped, limit),
                1.0,
                True,
                f"{stepped:.0f} B vs limit {limit:.0f} B",
            )
    return rows
