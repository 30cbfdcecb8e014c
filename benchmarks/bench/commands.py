"""The ``rnnserve bench`` command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer


def bench(
    repository: Annotated[
        Path | None, typer.Option(help="model repository; default: build the bench LSTM")
    ] = None,
    model: Annotated[str, typer.Option(help="model to measure (with --repository)")] = "",
    unbatched_model: Annotated[
        str, typer.Option(help="a max_batch_size=1 copy of --model, for batching on/off")
    ] = "",
    quick: Annotated[bool, typer.Option(help="smoke run, under a minute")] = False,
    out_dir: Annotated[Path, typer.Option(help="where JSON and PNGs go")] = Path(
        "benchmarks/results"
    ),
    name: Annotated[str, typer.Option(help="file stem; default bench-<UTC time>")] = "",
    client_procs: Annotated[int, typer.Option(help="load processes per measurement")] = 1,
    duration: Annotated[float, typer.Option(help="seconds per measurement window")] = 0.0,
    memory_sessions: Annotated[
        str, typer.Option(help="comma-separated session counts for the memory test")
    ] = "",
    profile: Annotated[bool, typer.Option(help="sample the server with py-spy")] = True,
    frontends: Annotated[
        str,
        typer.Option(
            help="comma-separated --frontends values: the first serves the whole run, each "
            "other is measured on the StreamSteps sweep at 64 and 256 sessions (e.g. 1,2,4,8 "
            "on a host with 8+ cores)"
        ),
    ] = "1,2",
    frontend_channels: Annotated[
        int,
        typer.Option(
            help="connections per load process when --frontends values are compared (a "
            "connection reaches one frontend: SO_REUSEPORT spreads connections)"
        ),
    ] = 16,
    device: Annotated[
        str, typer.Option(help="rnnserve serve --device for the server and the floors")
    ] = "auto",
    tf32: Annotated[
        bool, typer.Option(help="rnnserve serve --tf32 (TF32 matmuls on CUDA), floors alike")
    ] = False,
    sessions: Annotated[
        str, typer.Option(help="comma-separated session counts of the throughput sweep")
    ] = "",
    max_batch: Annotated[
        int, typer.Option(help="max_batch_size of the built bench model (and floor batches)")
    ] = 256,
    rounds: Annotated[
        int,
        typer.Option(
            min=0,
            help="alternating rounds of each side-by-side pair (rnnserve and its floor), "
            "each side keeping its best; 0: 2, or 1 with --quick",
        ),
    ] = 0,
) -> None:
    """Measure rnnserve against a bare gRPC echo and onnxruntime alone, on the same model."""
    from .model import BATCHED
    from .report import print_table, write_json, write_plots
    from .run import BenchConfig, run

    overrides: dict = {
        "client_procs": client_procs,
        "device": device,
        "max_batch": max_batch,
        "tf32": tf32,
    }
    if sessions:
        overrides["sessions"] = tuple(int(n) for n in sessions.split(","))
    if repository is not None:
        if not model:
            raise typer.BadParameter("--model is required with --repository")
        overrides |= {
            "repository": repository,
            "model": model,
            "unbatched_model": unbatched_model or None,
        }
    else:
        overrides["model"] = model or BATCHED
    if duration:
        overrides["duration_s"] = duration
    if rounds:
        overrides["rounds"] = rounds
    overrides["frontends"] = tuple(int(n) for n in frontends.split(","))
    overrides["frontend_channels"] = frontend_channels
    if memory_sessions:
        overrides["memory_sessions"] = tuple(int(n) for n in memory_sessions.split(","))
    if quick:
        config = BenchConfig.quick_config(**overrides)
    else:
        config = BenchConfig(**overrides, profile=profile)
    doc = run(config)
    stem = name or time.strftime("bench-%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(doc, out_dir / f"{stem}.json")
    try:
        plots = [str(p) for p in write_plots(doc, out_dir, stem)]
    except ModuleNotFoundError as exc:  # a host without matplotlib (the GPU host): plot later
        plots = [f"no plots ({exc.name} is missing: benchmarks/gpu_check.sh plots FILE.json)"]
    print_table(doc)
    typer.echo(f"wrote {out_dir / f'{stem}.json'} and {', '.join(plots)}")


def register(app: typer.Typer) -> None:
    """Attach ``bench`` to the ``rnnserve`` command line."""
    app.command("bench")(bench)
