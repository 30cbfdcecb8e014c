"""One frontend: a grpc.aio server with the InferenceService, health, reflection, drain and auth.

The same function serves in the engine's own process (one frontend) and in each frontend
process (several, sharing one port with SO_REUSEPORT); only the engine handle differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rnnserve.v1 import inference_service_pb2 as pb

from ..errors import ConfigError
from ..metrics import Metrics
from .admin import SERVICE as ADMIN_SERVICE
from .admin import AdminService
from .budget import StepBudget
from .drain import Drain
from .engine_api import EngineApi
from .handlers import Around, Refused, add_service, chain, method_path
from .limits import MAX_SEND_BYTES, ConnectionLimits, repository_message_limit
from .model_health import ModelHealth
from .security import Authenticator, TlsFiles, TokenInterceptor, TokenTable, server_credentials
from .service import InferenceService

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class FrontendOptions:
    """What every frontend of one server is started with (picklable: it crosses processes)."""

    host: str
    port: int
    max_message_bytes: int  # largest request read; 0: sized from the models (limits.py)
    tls: TlsFiles | None = None
    tokens: TokenTable | None = None
    health_port: int = 0  # plaintext port serving only health checks (first frontend only)
    limits: ConnectionLimits = ConnectionLimits()
    #: Who may call the AdminService when callers are authenticated (--admin-identity).
    admin_identities: frozenset[str] = frozenset()
    #: How long the frontend's loop keeps polling after a step (busy_poll.py); 0: never.
    busy_poll_s: float = 0.0
    #: Share the port with the server's other frontends (SO_REUSEPORT). Off for a lone
    #: frontend: on, a second server started on a port in use would bind it too, silently,
    #: and take half the new connections to sessions it does not have.
    share_port: bool = False


@dataclass
class Frontend:
    """A started frontend and what its owner needs to drain and stop it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    drain: Drain
    port: int
    health_server: grpc.aio.Server | None

    async def begin_drain(self) -> None:
        await self.health.enter_graceful_shutdown()
        self.drain.begin()

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
        if self.health_server is not None:
            await self.health_server.stop(0)


def refusal_counter(metrics: Metrics, services: tuple[ServiceDescriptor, ...]) -> Refused:
    """Counts a call refused before its method's code ran (no or a bad token, its message
    unreadable, too large or late, the server draining) in ``requests_total``, with the
    code it got and ``model=""`` (its request was not read, or not by the method). Only the
    methods of ``services``: a made-up method name never becomes a label."""
    names = {method_path(m): m.name for service in services for m in service.methods}
    requests = metrics.requests

    def refused(path: str, code: grpc.StatusCode) -> None:
        name = names.get(path)
        if name is not None:
            requests.labels(name, "", code.name).inc()

    return refused


async def start_frontend(engine: EngineApi, metrics: Metrics, options: FrontendOptions) -> Frontend:
    drain = Drain()
    inference = pb.DESCRIPTOR.services_by_name["InferenceService"]
    refused = refusal_counter(metrics, (inference, ADMIN_SERVICE))
    tls = options.tls
    # Auth, then the drain gate, around every InferenceService call (health and reflection
    # answer regardless), wrapped once at registration rather than by per-call interceptors.
    # Tokens are the exception: they are checked on the headers by an interceptor, before
    # the request message is read, so a caller without one cannot make the server read it.
    around: Around = drain.admit
    authenticated = options.tokens is not None or (tls is not None and tls.client_ca is not None)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if options.tokens is not None:
        interceptors.append(TokenInterceptor(Authenticator(options.tokens), refused))
    elif tls is not None and tls.client_ca is not None:
        around = chain(Authenticator(None, mutual_tls=True).admit, drain.admit)
    limits = options.limits
    catalogue = engine.catalogue()
    receive = options.max_message_bytes or repository_message_limit(catalogue.root, catalogue.all())
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", receive),
            ("grpc.max_send_message_length", max(receive, MAX_SEND_BYTES)),
            *limits.grpc_options(),
            ("grpc.so_reuseport", int(options.share_port)),
            # Calls not yet picked up by the event loop are cancelled by gRPC past these
            # limits; rnnserve sheds load itself (bounded queues, RESOURCE_EXHAUSTED), so
            # let a burst reach it instead of being cancelled silently.
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 200_000),
        ],
    )
    service = InferenceService(
        engine,
        metrics,
        drain,
        stream_idle_s=limits.stream_idle,
        budget=StepBudget(limits.steps_per_identity, limits.bytes_per_identity),
        unsent_bytes_per_stream=limits.unsent_bytes_per_stream,
    )
    add_service(server, service, inference, around, limits.body_timeout, refused)
    admin = AdminService(engine, metrics, options.admin_identities, authenticated)
    add_service(server, admin, ADMIN_SERVICE, around, limits.body_timeout, refused)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            ADMIN_SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{options.host}:{options.port}"
    try:
        if tls is not None:
            port = server.add_secure_port(address, server_credentials(tls))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind": the port is taken (or not ours to take)
        raise ConfigError(f"--port {options.port}: cannot listen on {address} (in use?)") from None
    health_server = None
    if options.health_port:
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_server.add_insecure_port(f"{options.host}:{options.health_port}")
    await server.start()
    if health_server is not None:
        await health_server.start()
    model_health = ModelHealth(health_servicer)  # per model and version, as they come and go
    await model_health.update(engine.catalogue())
    engine.on_catalogue(model_health.listener)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return Frontend(server, health_servicer, drain, port, health_server)
