"""The server's sub-commands: ``rnnserve serve`` and ``rnnserve models``."""

from __future__ import annotations

import contextlib
import enum
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer


class LogLevel(enum.StrEnum):
    """``--log-level`` values (logging's level names)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


@contextlib.contextmanager
def _metrics_folder(frontends: int) -> Iterator[None]:
    """With several processes, every one writes its metrics into one folder, read back for
    /metrics (prometheus-client's multiprocess mode, chosen before its first import)."""
    import os
    import shutil
    import sys
    import tempfile

    if frontends <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the metrics folder was set")
    folder = tempfile.mkdtemp(prefix="rnnserve-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(config: object) -> None:
    """Run :func:`serve` on uvloop when installed, else asyncio's loop."""
    import asyncio

    from .app import serve

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config))  # type: ignore[arg-type]
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config))  # type: ignore[arg-type]


def default_frontends() -> int:
    """Half the cores this process may use: the other half runs the engine, onnxruntime and
    gRPC's own threads. One frontend (in the engine's process) on small machines."""
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def serve_command(
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path(
        "model_repository"
    ),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="gRPC port; 0 picks a free one.")] = 50051,
    metrics_port: Annotated[
        int, typer.Option(help="Prometheus port; 0 picks a free one, -1 turns it off.")
    ] = 9090,
    port_file: Annotated[
        Path | None, typer.Option(help="Write {grpc_port, metrics_port, pid} here once ready.")
    ] = None,
    grace: Annotated[
        float, typer.Option("--grace", "--grace-s", help="Seconds to finish calls on SIGTERM.")
    ] = 10.0,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            help="Largest gRPC request read. 0 (default): twice the largest request a model of "
            "the repository accepts (max_timesteps steps of every input plus a state) plus "
            "64 KiB, at least 4 MiB, at most 64 MiB."
        ),
    ] = 0,
    body_timeout_s: Annotated[
        float,
        typer.Option(
            help="A unary request's message must arrive within this (0 = no limit).",
            rich_help_panel="Connections",
        ),
    ] = 30.0,
    stream_idle_s: Annotated[
        float,
        typer.Option(
            help="End a StreamSteps call that sends nothing this long with no step "
            "outstanding (0 = never).",
            rich_help_panel="Connections",
        ),
    ] = 300.0,
    connection_idle_s: Annotated[
        float,
        typer.Option(
            help="Close connections with no call for this long (0 = never).",
            rich_help_panel="Connections",
        ),
    ] = 300.0,
    connection_age_s: Annotated[
        float,
        typer.Option(
            help="Close every connection at this age, after its calls end or "
            "--connection-age-grace-s (0 = never; e.g. to rebalance behind a proxy).",
            rich_help_panel="Connections",
        ),
    ] = 0.0,
    connection_age_grace_s: Annotated[
        float,
        typer.Option(
            help="Seconds calls get to end once a connection is too old.",
            rich_help_panel="Connections",
        ),
    ] = 30.0,
    keepalive_s: Annotated[
        float,
        typer.Option(
            help="Ping a silent peer this often to find dead ones (0 = never).",
            rich_help_panel="Connections",
        ),
    ] = 60.0,
    keepalive_timeout_s: Annotated[
        float,
        typer.Option(
            help="Drop a peer that does not answer a ping within this.",
            rich_help_panel="Connections",
        ),
    ] = 20.0,
    min_client_ping_s: Annotated[
        float,
        typer.Option(
            help="Clients may ping this often at most; more often and the connection is "
            "closed (GOAWAY ENHANCE_YOUR_CALM).",
            rich_help_panel="Connections",
        ),
    ] = 10.0,
    steps_per_identity: Annotated[
        int,
        typer.Option(
            help="Most steps one identity may have queued and unanswered per frontend; past "
            "it, its streams stop being read and its unary steps get RESOURCE_EXHAUSTED, so "
            "no identity can fill a model's queue for everyone.",
            rich_help_panel="Connections",
        ),
    ] = 1024,
    bytes_per_identity: Annotated[
        int,
        typer.Option(
            help="Most bytes (requests' serialized size) of the steps one identity may have "
            "queued and unanswered per frontend; past it, as for --steps-per-identity. A single "
            "larger step still runs when the identity has nothing else unanswered.",
            rich_help_panel="Connections",
        ),
    ] = 256 << 20,
    unsent_bytes_per_stream: Annotated[
        int,
        typer.Option(
            help="Most bytes of results one StreamSteps call may have answered and not yet "
            "sent (a client that does not read its replies); past it, with what its "
            "unanswered steps are expected to add, the stream stops being read until the "
            "client reads. A single larger result is still sent.",
            rich_help_panel="Connections",
        ),
    ] = 64 << 20,
    snapshot: Annotated[
        Path | None, typer.Option(help="Save sessions here on stop; restore them on start.")
    ] = None,
    snapshot_interval_s: Annotated[
        float | None, typer.Option(help="Also save a snapshot this often (seconds).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA of client certificates: turns on mutual TLS.")
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="Bearer tokens, one 'identity:token' a line (else env RNNSERVE_TOKENS)."),
    ] = None,
    snapshot_key_file: Annotated[
        Path | None,
        typer.Option(
            help="Key (at least 32 bytes) that signs saved sessions, snapshot and state store "
            "(else env RNNSERVE_SNAPSHOT_KEY); required with tokens or mutual TLS when sessions "
            "are saved."
        ),
    ] = None,
    max_sessions_per_identity: Annotated[
        int, typer.Option(help="Most open sessions per identity; 0 = no limit.")
    ] = 0,
    health_port: Annotated[
        int, typer.Option(help="Extra plaintext port serving only health checks; 0 = none.")
    ] = 0,
    state_store: Annotated[
        str | None,
        typer.Option(
            help="Shared store for parked and handed-off sessions, e.g. redis://redis:6379/0. "
            "With it, a full slab parks its least recently used session instead of refusing "
            "(or evicting), and a draining server hands its sessions off there."
        ),
    ] = None,
    state_store_prefix: Annotated[
        str, typer.Option(help="Key prefix of sessions in the state store.")
    ] = "rnnserve:session:",
    park_after_s: Annotated[
        float | None,
        typer.Option(help="Park sessions idle this many seconds (needs --state-store)."),
    ] = None,
    frontends: Annotated[
        int,
        typer.Option(
            help="gRPC frontends. 1 serves from the engine's own process; more start that many "
            "frontend processes sharing the port (SO_REUSEPORT). Default: half the CPU cores "
            "(at least 1, at most 8)."
        ),
    ] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="Where models run: auto (CUDA when it really works, else CPU with one log line "
            "saying why), cuda (refuse to start without it) or cpu."
        ),
    ] = "auto",
    slabs: Annotated[
        str,
        typer.Option(
            help="Where session state lives: auto (device memory on CUDA, host memory on CPU), "
            "host (numpy) or device (onnxruntime OrtValues on the session's device)."
        ),
    ] = "auto",
    tf32: Annotated[
        bool,
        typer.Option(
            help="Let CUDA use TF32 matmuls: faster on large batches, but a session's numbers "
            "then drift from FP32 (~5e-4) and move with its batch's size. Off: exact FP32."
        ),
    ] = False,
    admin_identity: Annotated[
        list[str] | None,
        typer.Option(
            help="Identity (token name, client certificate subject, or san:KIND:value,... "
            "for a certificate with an empty subject) that may call the "
            "AdminService (load, retire, index, move); repeatable. Without authentication "
            "every caller may; with it, only these."
        ),
    ] = None,
    poll_repository_s: Annotated[
        float | None,
        typer.Option(
            help="Look for new version folders (and models) in the repository this often "
            "(seconds) and load them as LoadModel does."
        ),
    ] = None,
    busy_poll_us: Annotated[
        int,
        typer.Option(
            help="Keep each event loop polling this many microseconds after a step instead of "
            "sleeping: lower latency for a client that sends its next step soon, at up to this "
            "much CPU per step when steps are sparse. 0: off."
        ),
    ] = 1500,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="Logging level.")
    ] = LogLevel.INFO,
) -> None:
    """Serve a model repository over gRPC."""
    frontends = frontends or default_frontends()
    options = dict(locals())
    with _metrics_folder(frontends):
        _serve(**options)


def _serve(
    *,
    repository: Path,
    host: str,
    port: int,
    metrics_port: int,
    port_file: Path | None,
    grace: float,
    max_message_bytes: int,
    body_timeout_s: float,
    stream_idle_s: float,
    connection_idle_s: float,
    connection_age_s: float,
    connection_age_grace_s: float,
    keepalive_s: float,
    keepalive_timeout_s: float,
    min_client_ping_s: float,
    steps_per_identity: int,
    bytes_per_identity: int,
    unsent_bytes_per_stream: int,
    snapshot: Path | None,
    snapshot_interval_s: float | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    token_file: Path | None,
    snapshot_key_file: Path | None,
    max_sessions_per_identity: int,
    health_port: int,
    state_store: str | None,
    state_store_prefix: str,
    park_after_s: float | None,
    frontends: int,
    device: str,
    slabs: str,
    tf32: bool,
    admin_identity: list[str] | None,
    poll_repository_s: float | None,
    busy_poll_us: int,
    log_level: LogLevel,
) -> None:
    from .app import ServerConfig
    from .errors import ConfigError
    from .frontend.limits import ConnectionLimits
    from .frontend.security import SecurityConfigError, TlsFiles

    logging.basicConfig(
        level=LogLevel(log_level).value, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    metrics_host = "0.0.0.0" if host in ("0.0.0.0", "::") else host  # noqa: S104
    config = ServerConfig(
        repository=repository,
        host=host,
        port=port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        port_file=port_file,
        grace_s=grace,
        max_message_bytes=max_message_bytes,
        limits=ConnectionLimits(
            body_timeout_s=body_timeout_s,
            stream_idle_s=stream_idle_s,
            connection_idle_s=connection_idle_s,
            connection_age_s=connection_age_s,
            connection_age_grace_s=connection_age_grace_s,
            keepalive_s=keepalive_s,
            keepalive_timeout_s=keepalive_timeout_s,
            min_client_ping_s=min_client_ping_s,
            steps_per_identity=steps_per_identity,
            bytes_per_identity=bytes_per_identity,
            unsent_bytes_per_stream=unsent_bytes_per_stream,
        ),
        snapshot_path=snapshot,
        snapshot_interval_s=snapshot_interval_s,
        tls=None,
        token_file=token_file,
        snapshot_key_file=snapshot_key_file,
        max_sessions_per_identity=max_sessions_per_identity,
        health_port=health_port,
        state_store=state_store,
        state_store_prefix=state_store_prefix,
        park_after_s=park_after_s,
        frontends=frontends,
        device=device,
        slabs=slabs,
        tf32=tf32,
        admin_identities=tuple(admin_identity or ()),
        poll_repository_s=poll_repository_s,
        busy_poll_us=busy_poll_us,
    )
    for problem in config.problems():
        typer.echo(f"rnnserve: {problem}", err=True)
    if config.problems():
        raise typer.Exit(2)
    if (tls_cert is None) != (tls_key is None) or (tls_client_ca and tls_cert is None):
        typer.echo(
            "rnnserve: --tls-cert and --tls-key go together (and --tls-client-ca needs them)",
            err=True,
        )
        raise typer.Exit(2)
    if tls_cert is not None and tls_key is not None:
        config.tls = TlsFiles(tls_cert, tls_key, tls_client_ca)
    try:
        _run(config)
    except (ConfigError, SecurityConfigError) as exc:
        typer.echo(f"rnnserve: cannot serve: {exc}", err=True)
        raise typer.Exit(2) from None


def models_command(
    context: typer.Context,
    repository: Annotated[Path, typer.Option(help="Model repository folder.")] = Path(
        "model_repository"
    ),
) -> None:
    """List the models of a repository (config only, nothing is loaded); with a sub-command,
    manage the versions a running server serves."""
    if context.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from .errors import ConfigError
    from .repository import scan_repository

    try:
        repo = scan_repository(repository)
    except ConfigError as exc:
        typer.echo(f"rnnserve: {exc}", err=True)
        raise typer.Exit(2) from None
    table = Table(title=f"models in {repository}")
    for column in ("model", "versions", "cell", "inputs", "outputs", "states"):
        table.add_column(column)
    for name in sorted(repo.models):
        config = repo.get(name).config
        table.add_row(
            name,
            ", ".join(repo.versions(name)),
            config.cell_kind,
            ", ".join(f"{t.name}{t.session_shape}" for t in config.inputs),
            ", ".join(f"{t.name}{t.session_shape}" for t in config.outputs),
            ", ".join(f"{s.input}->{s.output}{s.session_shape}" for s in config.states),
        )
    # Piped (not a terminal): as wide as the names need, never cut to 80 columns.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``models`` (with ``load``, ``retire``, ``index``, ``move``)."""
    from .admin_commands import register_admin

    app.command("serve")(serve_command)
    models = typer.Typer(help="Models of a repository, and of a running server.")
    models.callback(invoke_without_command=True)(models_command)
    register_admin(models)
    app.add_typer(models, name="models")
