"""Composition root: build every part of one server from a :class:`ServerConfig` and run it.

Nothing here lives at module level: :func:`serve` creates the repository, session store,
batchers, metrics registry and gRPC server, and tears them down in order on SIGTERM
(health NOT_SERVING, refuse new calls, let running ones finish, stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .batcher import Batcher
from .drain import Drain, DrainInterceptor
from .metrics import Metrics
from .parking import Parking
from .persistence import Persistence
from .repository import load_repository
from .security import (
    Authenticator,
    AuthInterceptor,
    TlsFiles,
    current_identity,
    load_tokens,
    server_credentials,
)
from .service import InferenceService
from .sessions import Session, SessionStore
from .snapshot import Snapshotter, load_snapshot
from .state_store import DEFAULT_PREFIX, RedisStateStore, StoreUnavailable, check_url

logger = logging.getLogger(__name__)
_ENDED = {"close", "expire", "evict"}
_OPENED = {"open", "fork", "restore"}
_MOVED = {"park": -1, "unpark": 1}  # resident count changes; parked sessions stay open
MAX_MESSAGE_BYTES = 64 << 20


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
    max_message_bytes: int = MAX_MESSAGE_BYTES
    snapshot_path: Path | None = None  # sessions saved here on stop, restored on start
    snapshot_interval_s: float | None = None  # also save periodically
    tls: TlsFiles | None = None  # TLS (mutual TLS with a client CA) on the main port
    token_file: Path | None = None  # bearer tokens (else env RNNSERVE_TOKENS, else none)
    max_sessions_per_identity: int = 0  # 0: no per-identity quota
    health_port: int = 0  # plaintext port serving only health checks; 0: none
    reap_interval_s: float = 1.0
    state_store: str | None = None  # redis://host:port/db: park and hand off sessions there
    state_store_prefix: str = DEFAULT_PREFIX
    park_after_s: float | None = None  # park sessions idle this long (needs state_store)

    def problems(self) -> list[str]:
        """What is wrong with the scale-out settings, each naming its flag; empty if fine."""
        found: list[str] = []
        if self.state_store is not None:
            why = check_url(self.state_store)
            if why is not None:
                found.append(f"--state-store {why}")
            if not self.state_store_prefix:
                found.append("--state-store-prefix must not be empty")
        if self.park_after_s is not None:
            if self.state_store is None:
                found.append("--park-after-s needs --state-store (where parked sessions go)")
            if not self.park_after_s > 0:
                found.append(f"--park-after-s must be > 0, got {self.park_after_s}")
        return found


def write_port_file(path: Path, grpc_port: int, metrics_port: int) -> None:
    """Write the ready file atomically (temporary file, then rename)."""
    payload = json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port, "pid": os.getpid()})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(payload)
    os.replace(tmp, path)


def _session_listener(metrics: Metrics) -> object:
    def on_event(event: str, session: Session) -> None:
        label = session.model.key
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
            label,
            session.position,
        )

    return on_event


async def _reap(store: SessionStore, parking: Parking, interval_s: float) -> None:
    """Expire idle sessions periodically (lookups also expire them lazily), park idle ones."""
    while True:
        await asyncio.sleep(interval_s)
        store.expire_idle()
        parking.prune()
        try:
            await parking.park_idle()
        except Exception:  # the reaper must outlive one bad round
            logger.exception("event=park_idle_failed")


async def serve(config: ServerConfig) -> None:
    """Run one server until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    repository = await loop.run_in_executor(None, load_repository, config.repository)
    metrics = Metrics()
    tokens = load_tokens(config.token_file)
    store = SessionStore(
        repository,
        _session_listener(metrics),  # type: ignore[arg-type]
        identity=current_identity,
        max_sessions_per_identity=config.max_sessions_per_identity,
    )
    snapshotter = None
    persistence = Persistence(repository, store)
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
    parking = Parking(
        store,
        persistence,
        repository,
        state_store,
        metrics,
        current_identity,
        config.park_after_s,
    )
    if config.snapshot_path is not None:
        result = load_snapshot(config.snapshot_path, persistence.check)
        restored = persistence.restore(result.accepted)
        logger.info(
            "event=restore path=%s restored=%d skipped=%d error=%r",
            config.snapshot_path,
            restored,
            len(result.rejected),
            result.error,
        )
        snapshotter = Snapshotter(
            config.snapshot_path, persistence.collect, config.snapshot_interval_s
        )
    batchers = {mv.key: Batcher(mv, store, metrics) for mv in repository.all()}
    for batcher in batchers.values():
        batcher.start()
    drain = Drain()
    interceptors: list[grpc.aio.ServerInterceptor] = [DrainInterceptor(drain)]
    if tokens is not None or (config.tls is not None and config.tls.client_ca is not None):
        interceptors.insert(0, AuthInterceptor(Authenticator(tokens)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Calls not yet picked up by the event loop are cancelled by gRPC past these
            # limits; rnnserve sheds load itself (bounded queues, RESOURCE_EXHAUSTED), so
            # let a burst reach it instead of being cancelled silently.
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 200_000),
        ],
    )
    pb_grpc.add_InferenceServiceServicer_to_server(
        InferenceService(repository, store, batchers, metrics, parking), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["InferenceService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        grpc_port = server.add_secure_port(address, server_credentials(config.tls))
    else:
        grpc_port = server.add_insecure_port(address)
    health_server = None
    if config.health_port:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{config.host}:{config.health_port}")
    metrics_http = None
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_http, _ = start_http_server(
            config.metrics_port, config.metrics_host, registry=metrics.registry
        )
        metrics_port = metrics_http.server_port
    await server.start()
    if health_server is not None:
        await health_server.start()
    for name in repository.models:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reaper = loop.create_task(_reap(store, parking, config.reap_interval_s))
    periodic = loop.create_task(snapshotter.run_periodically()) if snapshotter else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.port_file is not None:
        write_port_file(config.port_file, grpc_port, metrics_port)
    logger.info(
        "event=start grpc_port=%d metrics_port=%d models=%s",
        grpc_port,
        metrics_port,
        ",".join(mv.key for mv in repository.all()),
    )
    try:
        await stop.wait()
    finally:
        logger.info("event=stopping sessions=%d", len(store))
        if state_store is not None:
            # Before the health check sends traffic elsewhere: calls reaching another replica
            # ahead of the handoff get "retry shortly" (SESSION_MOVING), not NOT_FOUND.
            marked = await parking.mark_all_moving()
            logger.info("event=handoff_begin store=%s sessions=%d", state_store.name, marked)
        await health_servicer.enter_graceful_shutdown()
        drain.begin()
        await drain.wait_idle(config.grace_s)
        for batcher in batchers.values():
            await batcher.stop()
        for task in (reaper, periodic):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if state_store is not None:
            # Hand sessions off: another replica takes each one back on its next call. What
            # cannot be written (store down) stays for the snapshot, if there is one.
            handed = await parking.park_all()
            logger.info(
                "event=handoff store=%s sessions=%d left=%d", state_store.name, handed, len(store)
            )
        if snapshotter is not None:
            written = await snapshotter.write_now()
            logger.info("event=snapshot path=%s sessions=%d", config.snapshot_path, written)
        await server.stop(config.grace_s)
        if health_server is not None:
            await health_server.stop(0)
        if metrics_http is not None:
            metrics_http.shutdown()
        if state_store is not None:
            await state_store.close()
        repository.close()
        logger.info("event=stop")
