"""TLS, mutual TLS and bearer tokens on a real gRPC server on loopback.

The server here hosts one tiny method that answers with the caller's identity as the
server recorded it, plus grpc.health.v1, so every rule of ``security`` is seen from a
real client: who gets in, who does not, and under which name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rnnserve.server.frontend.handlers import Around, wrap_handler
from rnnserve.server.frontend.security import (
    TOKENS_ENV,
    Authenticator,
    SecurityConfigError,
    TlsFiles,
    TokenInterceptor,
    current_identity,
    load_tokens,
    parse_tokens,
    server_credentials,
)

from .certs import Pem, issue, issue_without_subject, make_ca

WHO = "/rnnserve.test.Who/Ask"
WHO_STREAM = "/rnnserve.test.Who/Stream"
ALICE_TOKEN = "alice-0123456789abcdef"
BOB_TOKEN = "bob-fedcba9876543210"


async def _ask(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return current_identity().encode()


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
    async for _ in requests:
        yield current_identity().encode()


def _who_handler(around: Around | None) -> grpc.GenericRpcHandler:
    handlers = {
        "Ask": grpc.unary_unary_rpc_method_handler(_ask),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }
    if around is not None:
        handlers = {name: wrap_handler(h, around) for name, h in handlers.items()}
    return grpc.method_handlers_generic_handler("rnnserve.test.Who", handlers)


async def _start(
    authenticator: Authenticator, credentials: grpc.ServerCredentials | None
) -> tuple[grpc.aio.Server, int]:
    # As the server composes them (frontend/server.py): tokens are checked by an interceptor
    # on the headers; otherwise (certificates, or nobody) each method runs inside admit.
    if authenticator.requires_token:
        server = grpc.aio.server(interceptors=[TokenInterceptor(authenticator)])
        server.add_generic_rpc_handlers([_who_handler(None)])
    else:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_who_handler(authenticator.admit)])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(folder)
    other_ca, other_cert, other_key = make_ca(folder, "unrelated CA")
    return {
        "ca": ca,
        "server": issue(folder, ca_cert, ca_key, "server", server=True),
        "alice": issue(folder, ca_cert, ca_key, "alice", server=False),
        "mallory": issue(folder, other_cert, other_key, "mallory", server=False),
        "other_ca": other_ca,
        # Signed by the trusted CA, subject empty: named in the SubjectAlternativeName only.
        "svc-a": issue_without_subject(
            folder, ca_cert, ca_key, "svc-a", [x509.DNSName("svc-a.example")]
        ),
        "svc-b": issue_without_subject(
            folder,
            ca_cert,
            ca_key,
            "svc-b",
            [
                x509.UniformResourceIdentifier("spiffe://example/ns/b"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.2")),
                x509.DNSName("svc-b.example"),
            ],
        ),
        "nameless": issue_without_subject(folder, ca_cert, ca_key, "nameless", []),
    }


def _tokens() -> Authenticator:
    return Authenticator(load_tokens(None, {TOKENS_ENV: f"alice:{ALICE_TOKEN},bob:{BOB_TOKEN}"}))


async def _call(channel: grpc.aio.Channel, token: str | None = None) -> str:
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    reply = await channel.unary_unary(WHO)(b"", metadata=metadata, timeout=10)
    return reply.decode()


async def test_without_tokens_or_certs_everyone_is_anonymous() -> None:
    server, port = await _start(Authenticator(None), None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _call(channel) == "anonymous"
    finally:
        await server.stop(None)


async def test_tokens_name_the_caller_and_refuse_everyone_else() -> None:
    server, port = await _start(_tokens(), None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await _call(channel, ALICE_TOKEN) == "alice"
            assert await _call(channel, BOB_TOKEN) == "bob"
            for bad in (None, "", "alice", ALICE_TOKEN[:-1], ALICE_TOKEN + "x", BOB_TOKEN.upper()):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _call(channel, bad)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stream = channel.stream_stream(WHO_STREAM)(
                iter([b"", b""]), metadata=(("authorization", f"Bearer {BOB_TOKEN}"),)
            )
            assert [item async for item in stream] == [b"bob", b"bob"]
            refused = channel.stream_stream(WHO_STREAM)(iter([b""]))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                _ = [item async for item in refused]
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Probes need no secret.
            probe = health_pb2_grpc.HealthStub(channel)
            reply = await probe.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_tls_serves_only_encrypted_clients(pki: dict[str, Pem]) -> None:
    files = TlsFiles(cert=pki["server"].cert, key=pki["server"].key)
    server, port = await _start(Authenticator(None), server_credentials(files))
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=pki["ca"].cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", trusted) as channel:
            assert await _call(channel) == "anonymous"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _call(channel)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_mutual_tls_names_the_client_by_its_certificate(pki: dict[str, Pem]) -> None:
    files = TlsFiles(cert=pki["server"].cert, key=pki["server"].key, client_ca=pki["ca"].cert)
    server, port = await _start(Authenticator(None, mutual_tls=True), server_credentials(files))
    root = pki["ca"].cert.read_bytes()
    try:
        alice = grpc.ssl_channel_credentials(
            root, pki["alice"].key.read_bytes(), pki["alice"].cert.read_bytes()
        )
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", alice) as channel:
            identity = await _call(channel)
        # The subject exactly as before: sessions and snapshots are keyed by this string.
        assert identity == "CN=alice,O=rnnserve tests"
        for credentials in (
            grpc.ssl_channel_credentials(root),  # no client certificate
            grpc.ssl_channel_credentials(
                root, pki["mallory"].key.read_bytes(), pki["mallory"].cert.read_bytes()
            ),  # signed by a CA the server does not trust
        ):
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await _call(channel)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_mutual_tls_names_a_certificate_without_subject_by_its_alternative_names(
    pki: dict[str, Pem],
) -> None:
    """An empty subject is legal (the SAN then carries the identity): such a client is named
    by its SAN entries, never ``anonymous``, and one naming nobody is refused."""
    files = TlsFiles(cert=pki["server"].cert, key=pki["server"].key, client_ca=pki["ca"].cert)
    server, port = await _start(Authenticator(None, mutual_tls=True), server_credentials(files))
    root = pki["ca"].cert.read_bytes()

    def credentials(who: str) -> grpc.ChannelCredentials:
        pem = pki[who]
        return grpc.ssl_channel_credentials(root, pem.key.read_bytes(), pem.cert.read_bytes())

    try:
        names = {}
        for who in ("svc-a", "svc-b", "alice"):
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials(who)) as channel:
                names[who] = await _call(channel)
        assert names == {
            "svc-a": "san:DNS:svc-a.example",
            # By kind (DNS, URI, email, IP), then sorted: the order in the certificate
            # does not matter.
            "svc-b": "san:DNS:svc-b.example,URI:spiffe://example/ns/b,IP:10.0.0.2",
            "alice": "CN=alice,O=rnnserve tests",
        }
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials("nameless")) as channel:
            for call in (_call(channel), _stream_once(channel)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "no subject and no subject alternative name" in caught.value.details()
    finally:
        await server.stop(None)


async def _stream_once(channel: grpc.aio.Channel) -> list[bytes]:
    return [item async for item in channel.stream_stream(WHO_STREAM)(iter([b""]))]


def test_certificate_identities_cannot_collide() -> None:
    """A SAN identity never equals a subject (gRPC writes subjects as RFC 2253
    ``type=value`` pairs, whose type never holds a colon), nor another SAN list."""
    mtls = Authenticator(None, mutual_tls=True)

    def named(**auth: list[bytes]) -> str | None:
        return mtls.identify((), {"x509_subject": [b""], **auth})

    assert named(peer_dns=[b"a.example"]) == "san:DNS:a.example"
    # Separators inside a value are escaped: two entries never read as one, or one as two.
    two = named(peer_uri=[b"spiffe://x/a", b"spiffe://x/b"])
    one = named(peer_uri=[b"spiffe://x/a,URI:spiffe://x/b"])
    assert two == "san:URI:spiffe://x/a,URI:spiffe://x/b"
    assert one == "san:URI:spiffe://x/a\\,URI:spiffe://x/b" and one != two
    # The same text as another kind is another identity.
    assert named(peer_dns=[b"10.0.0.2"]) != named(peer_ip=[b"10.0.0.2"])
    assert named() is None and named(x509_subject_alternative_name=[]) is None
    assert mtls.identify((), {"x509_subject": [b"CN=svc"]}) == "CN=svc"
    assert mtls.identify((), {}) is None  # no certificate at all: never anonymous
    assert Authenticator(None).identify((), {}) == "anonymous"


def test_token_file_format_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nalice:" + ALICE_TOKEN + "\nbob:" + BOB_TOKEN + "\n")
    table = load_tokens(path, {})
    assert table is not None and len(table) == 2
    assert table.identify(ALICE_TOKEN) == "alice" and table.identify("nope") is None
    assert load_tokens(None, {}) is None
    bad = {
        "no-colon-here-at-all": "expected",
        "alice:short": "16 characters",
        f"alice:{ALICE_TOKEN}\nalice:{BOB_TOKEN}": "listed twice",
        f"alice:{ALICE_TOKEN}\nbob:{ALICE_TOKEN}": "also another's",
        f"anonymous:{ALICE_TOKEN}": "reserved",
        "# only a comment": "no tokens",
    }
    for text, message in bad.items():
        with pytest.raises(SecurityConfigError, match=message):
            parse_tokens(text, "tokens.txt")
    with pytest.raises(SecurityConfigError, match="--token-file"):
        load_tokens(tmp_path / "missing", {})
