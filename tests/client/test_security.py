"""The SDK's bearer token and TLS options against a real server that requires them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rnnserve.client import AsyncClient, ClientOptions, Unauthenticated, Unavailable
from security.certs import issue, make_ca

from .reference import inputs_for

TOKEN = "sdk-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def serve_flags() -> str:
    """``rnnserve serve --help``; the tests skip while the server lacks the security flags."""
    result = subprocess.run(
        [sys.executable, "-m", "rnnserve.server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"},
    )
    return result.stdout


def _require(flags: str, *names: str) -> None:
    missing = [name for name in names if name not in flags]
    if missing:
        pytest.skip(f"rnnserve serve has no {missing} yet")


async def test_bearer_token_is_sent_and_required(
    sdk_testing: Any, sdk_repository: Path, serve_flags: str, tmp_path: Path
) -> None:
    _require(serve_flags, "--token-file")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"sdk:{TOKEN}\n")
    tokens.chmod(0o600)
    with sdk_testing.ServerProcess(sdk_repository, "--token-file", str(tokens)) as server:
        async with AsyncClient(server.address, options=ClientOptions(retries=0)) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_models()
        wrong = ClientOptions(bearer_token=TOKEN + "x", retries=0)
        async with AsyncClient(server.address, options=wrong) as client:
            with pytest.raises(Unauthenticated):
                await client.open_session("tiny_rnn")
        options = ClientOptions(bearer_token=TOKEN)
        async with AsyncClient(server.address, options=options) as client:
            async with await client.open_session("tiny_rnn") as session:
                await session.step(inputs_for(session.model, 2, seed=95))
                assert session.position == 2
        # The client commands take the token too (--token, else RNNSERVE_TOKEN).
        code = "from rnnserve.server.cli import main; main()"
        base = [sys.executable, "-c", code, "step", "--target", server.address]
        base += ["--model", "tiny_rnn", "--input", "[[0.1, 0.2, 0.3, 0.4]]"]
        for extra, env in (([], {}), (["--token", TOKEN], {}), ([], {"RNNSERVE_TOKEN": TOKEN})):
            done = subprocess.run(
                [*base, *extra],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env={**os.environ, **env},
            )
            if extra or env:
                assert done.returncode == 0, done.stderr
                assert '"position": 1' in done.stdout
            else:
                assert done.returncode == 1 and "UNAUTHENTICATED" in done.stderr


async def test_mutual_tls(
    sdk_testing: Any, sdk_repository: Path, serve_flags: str, tmp_path: Path
) -> None:
    _require(serve_flags, "--tls-cert", "--tls-key", "--tls-client-ca")
    ca, ca_cert, ca_key = make_ca(tmp_path)
    server_pem = issue(tmp_path, ca_cert, ca_key, "server", server=True)
    client_pem = issue(tmp_path, ca_cert, ca_key, "sdk-client", server=False)
    flags = (
        *("--tls-cert", str(server_pem.cert), "--tls-key", str(server_pem.key)),
        *("--tls-client-ca", str(ca.cert)),
    )
    with sdk_testing.ServerProcess(sdk_repository, *flags) as server:
        options = ClientOptions(
            root_certificates=ca.cert.read_bytes(),
            client_certificate=client_pem.cert.read_bytes(),
            client_private_key=client_pem.key.read_bytes(),
        )
        async with AsyncClient(server.address, options=options) as client:
            async with await client.open_session("tiny_gru") as session:
                await session.step(inputs_for(session.model, 1, seed=96))
                assert session.position == 1
        no_cert = ClientOptions(root_certificates=ca.cert.read_bytes(), retries=0, timeout=10)
        async with AsyncClient(server.address, options=no_cert) as client:
            with pytest.raises(Unavailable):
                await client.list_models()
