"""Who is calling: TLS and mutual TLS from files, bearer tokens, and the caller's identity.

Every session belongs to the identity that opened it (see ``sessions``); this module only
decides what that identity is, once per call, before any handler runs:

- with tokens configured, a call must carry ``authorization: Bearer <token>``; the identity
  is the name the token is listed under. A missing or unknown token is UNAUTHENTICATED,
  decided on the call's headers before its request message is read (:class:`TokenInterceptor`).
- else, with mutual TLS, the identity is the client certificate's subject (gRPC has already
  refused a peer without a certificate signed by the configured CA). A certificate may leave
  its subject empty and name its holder in the SubjectAlternativeName alone (RFC 5280): it is
  then named by those entries, ``san:DNS:a.example,URI:spiffe://...`` (see
  :func:`certificate_identity`); one naming nobody is UNAUTHENTICATED. Never ``anonymous``:
  that would put every such client in one identity, each free to use the others' sessions.
- else everyone is ``anonymous``: one shared identity, so ownership still separates nothing.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every known
token, so neither a token's content nor its length shows in how long a check takes.
Health checks and server reflection need no token: probes must work without secrets, and
both say nothing about sessions.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .. import errors
from ..errors import RnnserveError
from .handlers import EXEMPT_PREFIXES, Refused
from .status import abort

ANONYMOUS = "anonymous"
TOKENS_ENV = "RNNSERVE_TOKENS"
_identity: contextvars.ContextVar[str] = contextvars.ContextVar(
    "rnnserve_identity", default=ANONYMOUS
)


class SecurityConfigError(ValueError):
    """A credential or token file that cannot be used; the message names the file and line."""


def current_identity() -> str:
    """The identity of the call being handled (set by :class:`TokenInterceptor`, or by
    :meth:`Authenticator.admit` around the call)."""
    return _identity.get()


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the server's certificate chain and key, and optionally a client CA (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials for ``add_secure_port``; with a client CA, client certs are required."""
    cert = _read(files.cert, "--tls-cert")
    key = _read(files.key, "--tls-key")
    client_ca = _read(files.client_ca, "--tls-client-ca") if files.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class TokenTable:
    """Bearer tokens by identity, checked in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        """``tokens`` maps identity -> token; each token must be unique."""
        self._digests: tuple[tuple[bytes, str], ...] = tuple(
            (hashlib.sha256(token.encode()).digest(), identity)
            for identity, token in tokens.items()
        )

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, token: str) -> str | None:
        """The identity ``token`` belongs to, or None; every known token is compared."""
        candidate = hashlib.sha256(token.encode()).digest()
        found: str | None = None
        for digest, identity in self._digests:
            if hmac.compare_digest(candidate, digest) and found is None:
                found = identity
        return found


def parse_tokens(text: str, source: str) -> dict[str, str]:
    """Parse ``identity:token`` lines (``#`` comments and blank lines allowed).

    The environment variable may separate entries with commas instead of newlines.
    """
    tokens: dict[str, str] = {}
    seen: set[str] = set()
    entries = text.replace(",", "\n").splitlines() if source == TOKENS_ENV else text.splitlines()
    for number, line in enumerate(entries, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        identity, sep, token = line.partition(":")
        identity, token = identity.strip(), token.strip()
        where = f"{source}, entry {number}"
        if not sep or not identity or not token:
            raise SecurityConfigError(f"{where}: expected 'identity:token'")
        if identity == ANONYMOUS:
            raise SecurityConfigError(f"{where}: the identity {ANONYMOUS!r} is reserved")
        if identity in tokens:
            raise SecurityConfigError(f"{where}: identity {identity!r} is listed twice")
        if token in seen:
            raise SecurityConfigError(f"{where}: token of {identity!r} is also another's")
        if len(token) < 16:
            raise SecurityConfigError(f"{where}: token of {identity!r} is under 16 characters")
        tokens[identity] = token
        seen.add(token)
    if not tokens:
        raise SecurityConfigError(f"{source}: no tokens")
    return tokens


def load_tokens(
    token_file: Path | None, environ: Mapping[str, str] = os.environ
) -> TokenTable | None:
    """Tokens from ``--token-file`` or the ``RNNSERVE_TOKENS`` variable; None when neither."""
    if token_file is not None:
        text = _read(token_file, "--token-file").decode()
        return TokenTable(parse_tokens(text, str(token_file)))
    if environ.get(TOKENS_ENV):
        return TokenTable(parse_tokens(environ[TOKENS_ENV], TOKENS_ENV))
    return None


#: Prefix of an identity taken from a certificate's SubjectAlternativeName. gRPC writes a
#: subject as RFC 2253 ``type=value`` pairs whose type is a name or a dotted OID, never
#: holding a colon: no subject can equal a name that starts with ``san:``.
SAN_PREFIX = "san:"
#: The SAN kinds gRPC reports (its auth context property, then the kind as written in the
#: identity), in the order they are written.
_SAN_KINDS = (("peer_dns", "DNS"), ("peer_uri", "URI"), ("peer_email", "email"), ("peer_ip", "IP"))


def certificate_identity(auth: Mapping[str, Any]) -> str | None:
    """The identity a verified client certificate names, from gRPC's auth context, or None.

    The subject when it is not empty, exactly as gRPC writes it (``CN=alice,O=...``: sessions
    and snapshots are keyed by that string). Else the SubjectAlternativeName entries gRPC
    reads (DNS, URI, email, IP): ``san:`` then ``KIND:value`` entries joined by commas, by
    kind in that order and sorted within a kind, so the order in the certificate does not
    matter; ``\\`` and ``,`` in a value are escaped with a backslash, so two lists never
    read alike. The kind is part of the name: a DNS name ``10.0.0.2`` is not the address.
    None when the certificate names nobody (or there is none).
    """
    subject = auth.get("x509_subject") or auth.get("x509_common_name")
    if subject and _text(subject[0]):
        return _text(subject[0])
    entries = [
        f"{kind}:{_escape(value)}"
        for key, kind in _SAN_KINDS
        for value in sorted(_text(v) for v in auth.get(key) or ())
    ]
    return SAN_PREFIX + ",".join(entries) if entries else None


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,")


class Authenticator:
    """Turns a call's metadata and TLS peer into an identity, or refuses it."""

    def __init__(self, tokens: TokenTable | None, *, mutual_tls: bool = False) -> None:
        """``mutual_tls``: callers present certificates signed by the client CA, which name
        them (without tokens); without either, every caller is ``anonymous``."""
        self._tokens = tokens
        self._mutual_tls = mutual_tls

    @property
    def requires_token(self) -> bool:
        return self._tokens is not None

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Identify the caller (or refuse it) and record the identity for the handler."""
        identity = self.identify(context.invocation_metadata() or (), context.auth_context())
        if identity is None:
            await abort(context, self._refusal())
        # Each call runs in its own task, so the value never outlives the call.
        _identity.set(identity or ANONYMOUS)
        yield

    def identify(self, metadata: Sequence[tuple[str, Any]], auth: Mapping[str, Any]) -> str | None:
        """The caller's identity, or None when it is refused: a token is required and not
        valid, or (mutual TLS) its certificate names no subject and no SAN."""
        if self._tokens is not None:
            token = _bearer(metadata)
            return None if token is None else self._tokens.identify(token)
        if self._mutual_tls:
            return certificate_identity(auth)
        return ANONYMOUS

    def _refusal(self) -> RnnserveError:
        if self._tokens is None and self._mutual_tls:
            return RnnserveError(
                grpc.StatusCode.UNAUTHENTICATED,
                errors.UNAUTHENTICATED,
                "the client certificate has no subject and no subject alternative name "
                "(DNS, URI, email or IP) to name its holder by",
            )
        return _unauthenticated()


def _unauthenticated() -> RnnserveError:
    return RnnserveError(
        grpc.StatusCode.UNAUTHENTICATED, errors.UNAUTHENTICATED, "missing or invalid bearer token"
    )


async def _refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
    """End a call UNAUTHENTICATED without reading its request (it is streamed, never pulled)."""
    await abort(context, _unauthenticated())


# Registered as client-streaming whatever the method is: grpc reads a unary call's message
# before the handler runs, a streaming call's only when the handler asks, and this never asks.
_REFUSE = grpc.stream_unary_rpc_method_handler(_refuse)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token on a call's headers, before its request message is read.

    An unauthenticated caller can then make the server hold no more of its message than
    HTTP/2 flow control lets through, instead of a whole message up to the size limit. The
    identity it finds is the one the handler sees (:func:`current_identity`): the
    interceptor runs in the call's own task, ahead of the handler. Health and reflection pass.
    """

    def __init__(self, authenticator: Authenticator, refused: Refused | None = None) -> None:
        """``refused`` is told of every call refused here (its method, UNAUTHENTICATED)."""
        if not authenticator.requires_token:
            raise ValueError("TokenInterceptor needs tokens")
        self._authenticator = authenticator
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if (handler_call_details.method or "").startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        identity = self._authenticator.identify(metadata, {})
        if identity is None:
            if self._refused is not None:
                self._refused(handler_call_details.method or "", grpc.StatusCode.UNAUTHENTICATED)
            return _REFUSE
        _identity.set(identity)
        return await continuation(handler_call_details)


def _bearer(metadata: Sequence[tuple[str, Any]]) -> str | None:
    for key, value in metadata:
        if key == "authorization":
            scheme, _, token = _text(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _read(path: Path | None, flag: str) -> bytes:
    if path is None:
        raise SecurityConfigError(f"{flag}: no file given")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{flag} {path}: cannot read: {exc.strerror}") from exc
