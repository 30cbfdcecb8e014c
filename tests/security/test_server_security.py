"""A real ``rnnserve serve`` with tokens, quotas, TLS and mutual TLS.

Sessions belong to the identity that opened them: another identity gets exactly what it
would get for an id that does not exist (NOT_FOUND), on every method that names a session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from reliability.harness import (
    INPUT_SIZE,
    MODEL,
    ServerProcess,
    build_repository,
    inputs_for,
    step_request,
    stub,
)
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc
from rnnserve.v1 import inference_service_pb2 as pb

from .certs import Pem, issue, issue_without_subject, make_ca
from .identities import ALICE, BOB, auth, token_file

QUOTA = 3


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tokens")
    tokens = token_file(folder)
    server = ServerProcess(
        build_repository(folder / "repository"),
        *("--token-file", str(tokens), "--max-sessions-per-identity", str(QUOTA)),
        log_path=folder / "server.log",
        health_port=True,
    ).start()
    yield server
    server.stop()


def _calls_naming(session_id: str) -> dict[str, object]:
    x = np.zeros((1, INPUT_SIZE), np.float32)
    return {
        "Step": step_request(session_id, x),
        "GetSession": pb.GetSessionRequest(session_id=session_id),
        "ExportState": pb.ExportStateRequest(session_id=session_id),
        "ForkSession": pb.ForkSessionRequest(session_id=session_id),
        "ResetSession": pb.ResetSessionRequest(session_id=session_id),
        "CloseSession": pb.CloseSessionRequest(session_id=session_id),
    }


def _code(call, request, token: str | None) -> grpc.StatusCode:
    try:
        call(request, metadata=auth(token), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_no_token_no_entry(token_server: ServerProcess) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        service = stub(channel)
        for token in (None, "", "alice", ALICE + "0", BOB[:-1]):
            code = _code(service.ListModels, pb.ListModelsRequest(), token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, token
            code = _code(service.OpenSession, pb.OpenSessionRequest(model=MODEL), token)
            assert code == grpc.StatusCode.UNAUTHENTICATED, token
        # Probes need no token, on the main port and on the health port.
        for target in (token_server.address, f"127.0.0.1:{token_server.health_port}"):
            with grpc.insecure_channel(target) as probe:
                reply = health_pb2_grpc.HealthStub(probe).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_sessions_are_invisible_to_other_identities(token_server: ServerProcess) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        service = stub(channel)
        opened = service.OpenSession(pb.OpenSessionRequest(model=MODEL), metadata=auth(ALICE))
        mine = opened.session.session_id
        service.Step(step_request(mine, inputs_for(0, 0)), metadata=auth(ALICE))
        for method, request in _calls_naming(mine).items():
            code = _code(getattr(service, method), request, BOB)
            missing = _calls_naming("does-not-exist")[method]
            assert code == grpc.StatusCode.NOT_FOUND, method
            assert _code(getattr(service, method), missing, BOB) == code, method
        streamed = list(
            service.StreamSteps(
                iter([pb.StreamStepsRequest(steps=[_calls_naming(mine)["Step"]])]),
                metadata=auth(BOB),
            )
        )
        assert streamed[0].results[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
        # Nothing bob tried changed alice's session.
        session = service.GetSession(pb.GetSessionRequest(session_id=mine), metadata=auth(ALICE))
        assert session.session.position == 1
        forked = service.ForkSession(
            pb.ForkSessionRequest(session_id=mine), metadata=auth(ALICE)
        ).session.session_id
        assert _code(service.GetSession, pb.GetSessionRequest(session_id=forked), BOB) == (
            grpc.StatusCode.NOT_FOUND
        )
        for session_id in (mine, forked):
            service.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), metadata=auth(ALICE)
            )


def test_per_identity_quota(token_server: ServerProcess) -> None:
    with grpc.insecure_channel(token_server.address) as channel:
        service = stub(channel)
        ids = [f"quota-{i}" for i in range(QUOTA)]
        for session_id in ids:
            service.OpenSession(
                pb.OpenSessionRequest(model=MODEL, session_id=session_id), metadata=auth(ALICE)
            )
        over = pb.OpenSessionRequest(model=MODEL, session_id="quota-over")
        assert _code(service.OpenSession, over, ALICE) == grpc.StatusCode.RESOURCE_EXHAUSTED
        fork = pb.ForkSessionRequest(session_id=ids[0], new_session_id="quota-fork")
        assert _code(service.ForkSession, fork, ALICE) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another identity's quota is its own.
        assert _code(service.OpenSession, pb.OpenSessionRequest(model=MODEL), BOB) == (
            grpc.StatusCode.OK
        )
        service.CloseSession(pb.CloseSessionRequest(session_id=ids[0]), metadata=auth(ALICE))
        assert _code(service.OpenSession, over, ALICE) == grpc.StatusCode.OK
        for session_id in (*ids[1:], "quota-over"):
            service.CloseSession(
                pb.CloseSessionRequest(session_id=session_id), metadata=auth(ALICE)
            )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pem]:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_cert, ca_key = make_ca(folder)
    _, other_cert, other_key = make_ca(folder, "unrelated CA")
    return {
        "ca": ca,
        "server": issue(folder, ca_cert, ca_key, "server", server=True),
        "alice": issue(folder, ca_cert, ca_key, "alice", server=False),
        "bob": issue(folder, ca_cert, ca_key, "bob", server=False),
        "mallory": issue(folder, other_cert, other_key, "mallory", server=False),
        # Empty subjects, named in the SubjectAlternativeName only (or nowhere).
        "svc-a": issue_without_subject(
            folder, ca_cert, ca_key, "svc-a", [x509.DNSName("svc-a.example")]
        ),
        "svc-b": issue_without_subject(
            folder, ca_cert, ca_key, "svc-b", [x509.UniformResourceIdentifier("spiffe://x/b")]
        ),
        "nameless": issue_without_subject(folder, ca_cert, ca_key, "nameless", []),
    }


def test_mutual_tls_end_to_end(pki: dict[str, Pem], tmp_path: Path) -> None:
    server = ServerProcess(
        build_repository(tmp_path / "repository"),
        *("--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)),
        *("--tls-client-ca", str(pki["ca"].cert)),
        log_path=tmp_path / "server.log",
        health_port=True,
    ).start()
    root = pki["ca"].cert.read_bytes()

    def credentials(who: str | None) -> grpc.ChannelCredentials:
        if who is None:
            return grpc.ssl_channel_credentials(root)
        pem = pki[who]
        return grpc.ssl_channel_credentials(root, pem.key.read_bytes(), pem.cert.read_bytes())

    try:
        with grpc.secure_channel(server.address, credentials("alice")) as channel:
            service = stub(channel)
            service.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="tls-a"))
            assert service.Step(step_request("tls-a", inputs_for(0, 0))).position == 1
        with grpc.secure_channel(server.address, credentials("bob")) as channel:
            request = pb.GetSessionRequest(session_id="tls-a")
            assert _code(stub(channel).GetSession, request, None) == grpc.StatusCode.NOT_FOUND
        for who in (None, "mallory"):
            with grpc.secure_channel(server.address, credentials(who)) as channel:
                code = _code(stub(channel).ListModels, pb.ListModelsRequest(), None)
                assert code == grpc.StatusCode.UNAVAILABLE, who
        with grpc.insecure_channel(server.address) as channel:
            code = _code(stub(channel).ListModels, pb.ListModelsRequest(), None)
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


@pytest.mark.parametrize("frontends", [1, 2])
def test_mutual_tls_clients_named_only_in_the_alternative_name_are_kept_apart(
    pki: dict[str, Pem], tmp_path: Path, frontends: int
) -> None:
    """Two certificates with an empty subject and different SANs are two identities (before,
    both were ``anonymous`` and could step and close each other's sessions); one naming
    nobody is refused; a subject's identity is the same string as before."""
    alice = "CN=alice,O=rnnserve tests"
    server = ServerProcess(
        build_repository(tmp_path / "repository"),
        *("--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)),
        *("--tls-client-ca", str(pki["ca"].cert), "--admin-identity", alice),
        *("--frontends", str(frontends)),
        log_path=tmp_path / "server.log",
    ).start()
    root = pki["ca"].cert.read_bytes()

    def channel(who: str) -> grpc.Channel:
        pem = pki[who]
        credentials = grpc.ssl_channel_credentials(
            root, pem.key.read_bytes(), pem.cert.read_bytes()
        )
        return grpc.secure_channel(server.address, credentials)

    try:
        with channel("svc-a") as a, channel("svc-b") as b:
            mine, theirs = stub(a), stub(b)
            mine.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="san-1"))
            assert mine.Step(step_request("san-1", inputs_for(0, 0))).position == 1
            for method, request in _calls_naming("san-1").items():
                code = _code(getattr(theirs, method), request, None)
                assert code == grpc.StatusCode.NOT_FOUND, method
            # The id is free in b's own namespace, and a's session is untouched.
            theirs.OpenSession(pb.OpenSessionRequest(model=MODEL, session_id="san-1"))
            assert theirs.GetSession(pb.GetSessionRequest(session_id="san-1")).session.position == 0
            assert mine.GetSession(pb.GetSessionRequest(session_id="san-1")).session.position == 1
            # The names as the server holds them: a refused admin call quotes the identity.
            with pytest.raises(grpc.RpcError) as caught:
                admin_grpc.AdminServiceStub(a).RepositoryIndex(
                    admin_pb.RepositoryIndexRequest(), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'san:DNS:svc-a.example'" in (caught.value.details() or "")
        with channel("nameless") as nobody:
            for call, request in (
                (stub(nobody).ListModels, pb.ListModelsRequest()),
                (stub(nobody).OpenSession, pb.OpenSessionRequest(model=MODEL)),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "no subject and no subject alternative name" in (
                    caught.value.details() or ""
                )
        with channel("alice") as channel_a:  # the subject names alice exactly as before
            admin_grpc.AdminServiceStub(channel_a).RepositoryIndex(
                admin_pb.RepositoryIndexRequest(), timeout=10
            )
    finally:
        server.stop()
