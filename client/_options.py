"""How a client connects and retries: one keyword-only value object."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import grpc


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """Connection, security and retry settings of a client.

    ``timeout`` is the deadline of one SDK call in seconds, its retries and the waits between
    them included (None: no deadline), as a gRPC deadline is for a call with a retry policy:
    each try is sent with what is left, and a wait that would end past the deadline is not
    taken (the last error is raised at once). It bounds unary calls; a ``StreamSteps`` stream
    has no deadline. Every unary call is retried up to ``retries`` times after UNAVAILABLE or
    DEADLINE_EXCEEDED (each is safe to repeat: see ``AsyncClient``), waiting
    ``backoff * 2**attempt`` seconds, at most ``max_backoff``, or the delay the server asked
    for in a ``google.rpc.RetryInfo`` if that is longer; a server's delay is capped at
    ``max_backoff`` too, and the delay is on the raised error as ``retry_after`` either way.
    Each wait is then stretched by a random share of up to ``jitter`` (0.2: 0-20 % longer),
    so that clients turned away together (a drain, a store outage) do not all come back at
    the same moment; a wait is never shorter than the backoff or the server's delay.

    TLS is used when any of ``root_certificates``, ``client_certificate`` or ``tls`` is set;
    the certificate options take PEM bytes.
    ``bearer_token`` is sent as ``authorization: Bearer <token>``; ``metadata`` goes on every
    call. ``channel_options`` are passed to grpc as they are.
    """

    timeout: float | None = 30.0
    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    jitter: float = 0.2
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: bytes | None = None
    client_private_key: bytes | None = None
    tls_server_name: str | None = None
    bearer_token: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    channel_options: tuple[tuple[str, Any], ...] = ()
    interceptors: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive or None, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")
        if (self.client_certificate is None) != (self.client_private_key is None):
            raise ValueError("client_certificate and client_private_key go together")
        object.__setattr__(self, "metadata", tuple((k.lower(), v) for k, v in self.metadata))

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is a TLS channel."""
        return self.tls or self.root_certificates is not None or self.client_certificate is not None

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based), by the SDK's own backoff."""
        return float(min(self.max_backoff, self.backoff * (2**attempt)))

    def retry_delay(self, attempt: int, server_delay: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based) after an error whose
        RetryInfo asked for ``server_delay`` seconds (None: it sent none): the longer of the
        backoff and the server's delay, which is capped at ``max_backoff``, stretched by a
        random share of up to ``jitter``."""
        delay = self.backoff_delay(attempt)
        if server_delay is not None:
            delay = max(delay, min(float(server_delay), self.max_backoff))
        if self.jitter:
            delay *= 1.0 + self.jitter * random.random()
        return delay

    def call_metadata(self, session_id: str | None = None) -> tuple[tuple[str, str], ...]:
        """Metadata for one call; names the session for proxy affinity when there is one."""
        metadata: list[tuple[str, str]] = list(self.metadata)
        if self.bearer_token is not None:
            metadata.append(("authorization", f"Bearer {self.bearer_token}"))
        if session_id:
            metadata.append(("x-rnnserve-session-id", session_id))
        return tuple(metadata)

    def open_channel(self, target: str) -> grpc.aio.Channel:
        """A grpc.aio channel to ``target`` with these options."""
        options: list[tuple[str, Any]] = list(self.channel_options)
        if self.tls_server_name is not None:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        interceptors: Sequence[Any] | None = list(self.interceptors) or None
        if self.uses_tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.root_certificates,
                private_key=self.client_private_key,
                certificate_chain=self.client_certificate,
            )
            return grpc.aio.secure_channel(
                target, credentials, options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
