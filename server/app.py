"""Composition root: build the engine and its frontends from a :class:`ServerConfig`, run them.

Nothing here lives at module level: :func:`serve` loads the repository, creates the metrics
registry, the engine (sessions, batchers, residency, snapshots) and the frontends (gRPC), and
tears them down in order on SIGTERM: sessions marked as moving (with a state store), health
NOT_SERVING and new calls refused, running calls finished, then the engine stops (queued
steps answered, sessions handed off, snapshot written) and the servers close.

With ``frontends == 1`` the frontend runs in the engine's process and calls it directly;
with more, :mod:`.multiprocess` starts them as processes sharing the port.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import start_http_server

from .engine.core import Engine, EngineConfig
from .engine.persistence import OwnerCheck
from .engine.signing import KEY_ENV, load_key
from .engine.state_store import DEFAULT_PREFIX, RedisStateStore, StoreUnavailable, check_url
from .engine.store import SLAB_KINDS, Session
from .errors import ConfigError
from .frontend.limits import ConnectionLimits, repository_message_limit, version_too_large
from .frontend.security import ANONYMOUS, TOKENS_ENV, TlsFiles, load_tokens, parse_tokens
from .frontend.server import FrontendOptions, start_frontend
from .metrics import Metrics
from .repository import load_repository
from .runtime import DEVICES

logger = logging.getLogger(__name__)
_ENDED = {"close", "expire", "evict"}
_OPENED = {"open", "fork", "restore"}
# Resident count changes: parked sessions stay open; a moved one changes version.
_MOVED = {"park": -1, "unpark": 1, "move_out": -1, "move_in": 1}


@dataclass
class ServerConfig:
    """Everything one server run needs; later features add fields here."""

    repository: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9090  # 0: any free port; -1: no metrics endpoint
    port_file: Path | None = None
    grace_s: float = 10.0
    max_message_bytes: int = 0  # largest request read; 0: sized from the models
    limits: ConnectionLimits = ConnectionLimits()  # idle, keepalive, stalled calls
    snapshot_path: Path | None = None  # sessions saved here on stop, restored on start
    snapshot_interval_s: float | None = None  # also save periodically
    tls: TlsFiles | None = None  # TLS (mutual TLS with a client CA) on the main port
    token_file: Path | None = None  # bearer tokens (else env RNNSERVE_TOKENS, else none)
    snapshot_key_file: Path | None = None  # signs saved sessions (else env RNNSERVE_SNAPSHOT_KEY)
    max_sessions_per_identity: int = 0  # 0: no per-identity quota
    health_port: int = 0  # plaintext port serving only health checks; 0: none
    reap_interval_s: float = 1.0
    state_store: str | None = None  # redis://host:port/db: park and hand off sessions there
    state_store_prefix: str = DEFAULT_PREFIX
    park_after_s: float | None = None  # park sessions idle this long (needs state_store)
    frontends: int = 1  # gRPC frontends; above 1, each is a process of its own
    device: str = "auto"  # auto | cuda | cpu (runtime.choose_device)
    slabs: str = "auto"  # where state lives: auto | host | device (engine.store.state_memory)
    tf32: bool = False  # TF32 matmuls on CUDA (runtime.ort_providers)
    admin_identities: tuple[str, ...] = ()  # may call the AdminService when auth is on
    poll_repository_s: float | None = None  # load new version folders this often
    #: Keep each event loop polling this long after a step instead of sleeping (busy_poll.py).
    busy_poll_us: int = 1500

    def problems(self) -> list[str]:
        """What is wrong with the settings checked here, each naming its flag; empty if fine."""
        found: list[str] = []
        if self.state_store is not None:
            why = check_url(self.state_store)
            if why is not None:
                found.append(f"--state-store {why}")
            if not self.state_store_prefix:
                found.append("--state-store-prefix must not be empty")
        if self.device not in DEVICES:
            found.append(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.slabs not in SLAB_KINDS:
            found.append(f"--slabs must be one of {', '.join(SLAB_KINDS)}, got {self.slabs!r}")
        if self.max_message_bytes < 0:
            found.append(
                f"--max-message-bytes must be >= 0 (0 sizes it from the models), "
                f"got {self.max_message_bytes}"
            )
        found += self.limits.problems()
        if self.frontends < 1:
            found.append(f"--frontends must be >= 1, got {self.frontends}")
        if not 0 <= self.busy_poll_us <= 100_000:
            found.append(f"--busy-poll-us must be between 0 and 100000, got {self.busy_poll_us}")
        if self.poll_repository_s is not None and not self.poll_repository_s > 0:
            found.append(f"--poll-repository-s must be > 0, got {self.poll_repository_s}")
        if not 0 <= self.port <= 65535:
            found.append(f"--port must be between 0 and 65535 (0: any free port), got {self.port}")
        if not -1 <= self.metrics_port <= 65535:
            found.append(
                f"--metrics-port must be between -1 (none) and 65535, got {self.metrics_port}"
            )
        if not 0 <= self.health_port <= 65535:
            found.append(f"--health-port must be between 0 and 65535, got {self.health_port}")
        if self.max_sessions_per_identity < 0:
            found.append(
                "--max-sessions-per-identity must be >= 0 (0: no quota), "
                f"got {self.max_sessions_per_identity}"
            )
        if self.grace_s < 0:
            found.append(f"--grace must be >= 0, got {self.grace_s}")
        if self.snapshot_interval_s is not None:
            if self.snapshot_path is None:
                found.append("--snapshot-interval-s needs --snapshot (where sessions are saved)")
            if not self.snapshot_interval_s > 0:
                found.append(f"--snapshot-interval-s must be > 0, got {self.snapshot_interval_s}")
        if self.snapshot_path is not None:
            why = _unwritable(self.snapshot_path)
            if why is not None:
                found.append(f"--snapshot {self.snapshot_path}: {why}")
        if self.park_after_s is not None:
            if self.state_store is None:
                found.append("--park-after-s needs --state-store (where parked sessions go)")
            if not self.park_after_s > 0:
                found.append(f"--park-after-s must be > 0, got {self.park_after_s}")
        return found


def _unwritable(path: Path) -> str | None:
    """Why the snapshot cannot be written at ``path`` (found now, not at shutdown, when every
    session would be lost), or None. Writes and removes a temporary file beside it, as the
    snapshot's own write does."""
    if path.is_dir():
        return "is a folder; name a file"
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.check.")
    except OSError as exc:
        return f"cannot write in {path.parent} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(tmp)
    return None


def write_port_file(path: Path, grpc_port: int, metrics_port: int) -> None:
    """Write the ready file atomically (temporary file, then rename)."""
    payload = json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port, "pid": os.getpid()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(payload)
    os.replace(tmp, path)


def session_listener(metrics: Metrics) -> Callable[[str, Session], None]:
    """Session events as metrics and log lines."""

    def on_event(event: str, session: Session) -> None:
        labels = (session.model.name, session.model.version)
        if event in _OPENED:
            metrics.active_sessions.labels(*labels).inc()
        elif event in _ENDED:
            metrics.active_sessions.labels(*labels).dec()
            metrics.sessions_ended.labels(*labels, event).inc()
        elif event in _MOVED:
            metrics.active_sessions.labels(*labels).inc(_MOVED[event])
            return  # parking logs per batch of sessions, not per session
        logger.info(
            "event=session_%s session=%s model=%s position=%d",
            event,
            session.id,
            session.model.key,
            session.position,
        )

    return on_event


def owner_check(config: ServerConfig, environ: dict[str, str] | None = None) -> OwnerCheck:
    """Which identities can call this server, so which owners a saved session may name.

    With tokens, the identities listed; with mutual TLS alone, any certificate's name (they
    are not known in advance) but never ``anonymous``, which no caller is then; without
    authentication, ``anonymous`` only.
    """
    listed = _token_identities(config, environ)
    if listed is not None:
        return frozenset(listed[0]).__contains__
    if config.tls is not None and config.tls.client_ca is not None:
        return lambda owner: owner != ANONYMOUS
    return lambda owner: owner == ANONYMOUS


def known_owners(
    config: ServerConfig, environ: dict[str, str] | None = None
) -> frozenset[str] | None:
    """Every identity that can own a session here when they are known in advance, as
    :func:`owner_check` decides: the identities the tokens list, or ``anonymous`` alone
    without authentication; None with mutual TLS alone (any certificate's name)."""
    listed = _token_identities(config, environ)
    if listed is not None:
        return frozenset(listed[0])
    if config.tls is not None and config.tls.client_ca is not None:
        return None
    return frozenset({ANONYMOUS})


def _token_identities(
    config: ServerConfig, environ: Mapping[str, str] | None = None
) -> tuple[list[str], str] | None:
    """The identities the bearer tokens name and where they come from (``--token-file PATH``
    or ``env RNNSERVE_TOKENS``); None without tokens, or when the file cannot be read (the
    frontend's token loading reports that, naming the flag)."""
    env = os.environ if environ is None else environ
    if config.token_file is not None:
        try:
            text = Path(config.token_file).read_text()
        except OSError:
            return None
        return list(parse_tokens(text, str(config.token_file))), f"--token-file {config.token_file}"
    if env.get(TOKENS_ENV):
        return list(parse_tokens(env[TOKENS_ENV], TOKENS_ENV)), f"env {TOKENS_ENV}"
    return None


def check_admin_identities(config: ServerConfig, environ: Mapping[str, str] | None = None) -> None:
    """ConfigError when tokens are on and an ``--admin-identity`` is none of their identities:
    with tokens a caller's identity is its token's name, so that admin could never call the
    AdminService (found only when the first load is refused). With mutual TLS alone the
    identities are certificates' names, not known before they call; without authentication
    every caller may, and the flag changes nothing (logged once)."""
    if not config.admin_identities:
        return
    listed = _token_identities(config, environ)
    if listed is None:
        if config.tls is None or config.tls.client_ca is None:
            logger.warning(
                "event=admin_identity_unused reason=%r",
                f"without --token-file, env {TOKENS_ENV} or mutual TLS every caller may call "
                "the AdminService: --admin-identity restricts nothing",
            )
        return
    identities, source = listed
    unknown = [name for name in config.admin_identities if name not in identities]
    if unknown:
        named = ", ".join(f"--admin-identity {name!r}" for name in unknown)
        raise ConfigError(
            f"{named}: not an identity of {source} (it lists "
            f"{', '.join(repr(i) for i in identities)}); with tokens only their identities can "
            "call, so that admin could never reach the AdminService"
        )


def snapshot_key(config: ServerConfig, environ: dict[str, str] | None = None) -> bytes | None:
    """The key that signs saved sessions; ConfigError when authentication is on, sessions
    are saved (a snapshot or a state store) and there is no key.

    Refusing to start is the one safe answer: unsigned, a saved session's owner can be
    edited by whoever can write the file or reach Redis; and a key made up at start would
    make every restart (and every other replica) refuse what this one saved.
    """
    env = os.environ if environ is None else environ
    key = load_key(config.snapshot_key_file, env)
    authenticated = (
        config.token_file is not None
        or bool(env.get(TOKENS_ENV))
        or (config.tls is not None and config.tls.client_ca is not None)
    )
    saved = [
        flag
        for flag, value in (
            ("--snapshot", config.snapshot_path),
            ("--state-store", config.state_store),
        )
        if value is not None
    ]
    if key is None and authenticated and saved:
        raise ConfigError(
            f"{' and '.join(saved)} with authentication on needs a key that signs saved "
            f"sessions: --snapshot-key-file FILE or env {KEY_ENV} (at least 32 bytes, the same "
            "on every replica sharing them); unsigned, whoever can write them could hand a "
            "session to another identity"
        )
    return key


async def build_engine(config: ServerConfig, metrics: Metrics) -> Engine:
    """Load the repository and create the engine (not started)."""
    key = snapshot_key(config)  # before anything is loaded: a missing key stops the start
    check_admin_identities(config)
    loop = asyncio.get_running_loop()
    repository = await loop.run_in_executor(
        None, load_repository, config.repository, config.device, config.tf32
    )
    state_store = None
    if config.state_store is not None:
        state_store = RedisStateStore(
            config.state_store,
            config.state_store_prefix,
            on_error=lambda operation: metrics.store_errors.labels(operation).inc(),
        )
        try:
            await state_store.ping()
        except StoreUnavailable:
            pass  # logged once by the store; resident sessions do not need it
    # The frontends' receive limit, resolved once here so that every frontend (each process
    # too) reads the same and a version loaded later that needs more fails to load, saying so.
    receive = config.max_message_bytes
    version_check = None
    if not receive:
        receive = repository_message_limit(config.repository, repository.all())
        version_check = functools.partial(version_too_large, limit=receive)
    engine_config = EngineConfig(
        max_sessions_per_identity=config.max_sessions_per_identity,
        reap_interval_s=config.reap_interval_s,
        park_after_s=config.park_after_s,
        snapshot_path=config.snapshot_path,
        snapshot_interval_s=config.snapshot_interval_s,
        slabs=config.slabs,
        snapshot_key=key,
        knows_owner=owner_check(config),
        owners=known_owners(config),
        poll_repository_s=config.poll_repository_s,
        message_limit_bytes=receive,
        version_check=version_check,
        busy_poll_s=config.busy_poll_us / 1e6,
        handoff_wait_s=min(5.0, config.grace_s),
    )
    return Engine(repository, metrics, engine_config, state_store, session_listener(metrics))


def frontend_options(
    config: ServerConfig, port: int, health_port: int, max_message_bytes: int = 0
) -> FrontendOptions:
    """The frontends' options; ``max_message_bytes`` is the engine's resolved receive limit
    (:class:`EngineConfig`'s ``message_limit_bytes``), else ``--max-message-bytes``."""
    return FrontendOptions(
        host=config.host,
        port=port,
        max_message_bytes=max_message_bytes or config.max_message_bytes,
        tls=config.tls,
        tokens=load_tokens(config.token_file),
        health_port=health_port,
        limits=config.limits,
        admin_identities=frozenset(config.admin_identities),
        busy_poll_s=config.busy_poll_us / 1e6,
        share_port=config.frontends > 1,
    )


async def begin_stop(engine: Engine) -> None:
    """First step of a stop, before frontends turn calls away: with a state store, mark every
    session as moving, so a call that reaches another replica ahead of the handoff gets
    "retry shortly" (SESSION_MOVING), not NOT_FOUND."""
    logger.info("event=stopping sessions=%d", len(engine.store))
    if engine.state_store is not None:
        marked = await engine.begin_drain()
        logger.info("event=handoff_begin store=%s sessions=%d", engine.state_store.name, marked)


async def stop_engine(engine: Engine) -> None:
    await engine.stop()
    if engine.state_store is not None:
        await engine.state_store.close()
    engine.repository.close()


async def serve(config: ServerConfig) -> None:
    """Run one server until SIGTERM/SIGINT."""
    if config.frontends > 1:
        from .multiprocess import serve_multiprocess

        await serve_multiprocess(config)
        return
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    engine = await build_engine(config, metrics)
    await engine.start()
    frontend = await start_frontend(
        engine,
        metrics,
        frontend_options(
            config, config.port, config.health_port, engine.config.message_limit_bytes
        ),
    )
    metrics_http = None
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_http, _ = start_http_server(
            config.metrics_port, config.metrics_host, registry=metrics.registry
        )
        metrics_port = metrics_http.server_port
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.port_file is not None:
        write_port_file(config.port_file, frontend.port, metrics_port)
    logger.info(
        "event=start grpc_port=%d metrics_port=%d frontends=1 models=%s",
        frontend.port,
        metrics_port,
        ",".join(mv.key for mv in engine.repository.all()),
    )
    try:
        await stop.wait()
    finally:
        await begin_stop(engine)
        deadline = loop.time() + config.grace_s  # the whole stop keeps to --grace
        await frontend.begin_drain()
        await frontend.drain.wait_idle(config.grace_s)
        await stop_engine(engine)
        await frontend.stop(max(0.0, deadline - loop.time()))
        if metrics_http is not None:
            metrics_http.shutdown()
        logger.info("event=stop")
