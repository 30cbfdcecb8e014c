"""``rnnserve models load|retire|index|move --server ADDR``: the AdminService from a shell.

Each command makes one call and prints what the server answers: one line per version
(``model version state on_disk=... sessions=N reason``), or ``--json``. The exit status is
0 on success, 1 when the call fails or a load ends FAILED, so scripts can chain them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

TOKEN_ENV = "RNNSERVE_TOKEN"

_Server = Annotated[str, typer.Option("--server", help="Address of the running server.")]
_Token = Annotated[
    str | None,
    typer.Option("--token", help=f"Bearer token of an admin identity (else env {TOKEN_ENV})."),
]
_TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", exists=True, dir_okay=False, help="CA of the server's certificate: use TLS."
    ),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of lines.")]


def _call(server: str, token: str | None, tls_ca: Path | None, method: str, request: Any) -> Any:
    """One AdminService call; a failure is printed and exits 1."""
    import grpc
    from rnnserve.v1 import admin_service_pb2_grpc as pb_grpc

    token = token or os.environ.get(TOKEN_ENV) or None
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    if tls_ca is not None:
        credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes())
        channel = grpc.secure_channel(server, credentials)
    else:
        channel = grpc.insecure_channel(server)
    with channel:
        stub = pb_grpc.AdminServiceStub(channel)
        try:
            return getattr(stub, method)(request, metadata=metadata, timeout=600)
        except grpc.RpcError as error:
            code = error.code().name if error.code() else "UNKNOWN"
            typer.echo(f"rnnserve: {method}: {code}: {error.details()}", err=True)
            raise typer.Exit(1) from None


def _show(versions: list[Any], as_json: bool) -> None:
    from google.protobuf.json_format import MessageToDict

    if as_json:
        rows = [MessageToDict(v, always_print_fields_with_no_presence=True) for v in versions]
        typer.echo(json.dumps(rows, indent=2))
        return
    from rnnserve.v1 import admin_service_pb2 as pb

    for v in versions:
        line = (
            f"{v.model} {v.version} {pb.VersionState.Name(v.state)} "
            f"on_disk={str(v.on_disk).lower()} sessions={v.live_sessions}"
        )
        typer.echo(f"{line} {v.reason}".rstrip())
    sys.stdout.flush()


def load(
    model: Annotated[str, typer.Argument(help="Model name (its folder in the repository).")],
    server: _Server = "127.0.0.1:50051",
    version: Annotated[
        str, typer.Option(help="One version; default: every version on disk not loaded yet.")
    ] = "",
    token: _Token = None,
    tls_ca: _TlsCa = None,
    as_json: _Json = False,
) -> None:
    """Load a model, or one version of it, from the server's repository folder."""
    from rnnserve.v1 import admin_service_pb2 as pb

    reply = _call(
        server, token, tls_ca, "LoadModel", pb.LoadModelRequest(model=model, version=version)
    )
    _show(list(reply.versions), as_json)
    if any(v.state == pb.FAILED for v in reply.versions):
        raise typer.Exit(1)


def retire(
    model: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Option(help="The version to retire.")],
    server: _Server = "127.0.0.1:50051",
    token: _Token = None,
    tls_ca: _TlsCa = None,
    as_json: _Json = False,
) -> None:
    """Stop new sessions on a version; it is released when its last session ends."""
    from rnnserve.v1 import admin_service_pb2 as pb

    request = pb.RetireModelRequest(model=model, version=version)
    reply = _call(server, token, tls_ca, "RetireModel", request)
    _show([reply.version], as_json)


def index(
    server: _Server = "127.0.0.1:50051",
    token: _Token = None,
    tls_ca: _TlsCa = None,
    as_json: _Json = False,
) -> None:
    """Every version on disk or loaded: state, why, live sessions."""
    from rnnserve.v1 import admin_service_pb2 as pb

    reply = _call(server, token, tls_ca, "RepositoryIndex", pb.RepositoryIndexRequest())
    _show(list(reply.versions), as_json)


def move(
    session_id: Annotated[str, typer.Argument(help="The session to move.")],
    version: Annotated[str, typer.Option(help="Target version of the session's model.")],
    server: _Server = "127.0.0.1:50051",
    owner: Annotated[
        str,
        typer.Option(
            help="The session's owner, when several identities use the id, or may own a "
            "session that is parked or on another replica."
        ),
    ] = "",
    token: _Token = None,
    tls_ca: _TlsCa = None,
) -> None:
    """Carry a session's state to another version with exactly the same state pairs."""
    from rnnserve.v1 import admin_service_pb2 as pb

    request = pb.MoveSessionRequest(session_id=session_id, version=version, owner=owner)
    reply = _call(server, token, tls_ca, "MoveSession", request)
    typer.echo(f"{reply.session_id} {reply.model} {reply.version} position={reply.position}")


def register_admin(models: typer.Typer) -> None:
    """Attach the sub-commands to ``rnnserve models``."""
    models.command("load")(load)
    models.command("retire")(retire)
    models.command("index")(index)
    models.command("move")(move)
