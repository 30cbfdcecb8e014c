"""``rnnserve step`` and ``rnnserve stream``: a small client for trying a served model.

Registered by the ``rnnserve`` command line when the SDK is installed; typer is imported here
only, never by the SDK itself.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from ._exceptions import RnnserveError
from ._options import ClientOptions
from ._sync_client import Client

#: Where ``--token`` is read from when it is not given (the admin commands read it too).
TOKEN_ENV = "RNNSERVE_TOKEN"

_Target = Annotated[str, typer.Option(help="Server address, host:port.")]
_Model = Annotated[str, typer.Option(help="Model name.")]
_Version = Annotated[str, typer.Option(help="Model version; empty for the highest.")]
_Token = Annotated[
    str | None, typer.Option("--token", help=f"Bearer token (else env {TOKEN_ENV}).")
]
_TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", exists=True, dir_okay=False, help="CA of the server's certificate: use TLS."
    ),
]


def _options(token: str | None, tls_ca: Path | None) -> ClientOptions:
    """How to reach a server that wants a token, TLS, or both."""
    return ClientOptions(
        bearer_token=token or os.environ.get(TOKEN_ENV) or None,
        tls=tls_ca is not None,
        root_certificates=tls_ca.read_bytes() if tls_ca is not None else None,
    )


def register(app: typer.Typer) -> None:
    """Attach the client commands to the ``rnnserve`` app."""
    app.command("step")(step)
    app.command("stream")(stream)


def step(
    input: Annotated[str, typer.Option("--input", help="JSON array of shape (T, ...).")],
    model: _Model,
    target: _Target = "127.0.0.1:50051",
    version: _Version = "",
    token: _Token = None,
    tls_ca: _TlsCa = None,
) -> None:
    """Open a session, run one step with the given input, print its output and position."""
    try:
        x = json.loads(input)  # the SDK makes it an array of the model's dtype, or says why not
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--input") from None
    try:
        with (
            Client(target, options=_options(token, tls_ca)) as client,
            client.open_session(model, version=version) as session,
        ):
            output = session.step(x)
            typer.echo(json.dumps({"position": session.position, "output": _jsonable(output)}))
    except RnnserveError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def stream(
    model: _Model,
    target: _Target = "127.0.0.1:50051",
    version: _Version = "",
    steps: Annotated[int, typer.Option(min=1, help="Steps to stream.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the random inputs.")] = 0,
    token: _Token = None,
    tls_ca: _TlsCa = None,
) -> None:
    """Stream random single-timestep inputs through one session; print each step's latency.

    Float inputs get standard normal values; integer inputs (token ids) get 0, a valid id for
    any vocabulary counted from 0."""
    rng = np.random.default_rng(seed)
    try:
        with (
            Client(target, options=_options(token, tls_ca)) as client,
            client.open_session(model, version=version) as session,
        ):
            specs = session.model.data_inputs
            shapes = {
                s.name: tuple(1 if extent < 0 else extent for extent in s.shape) for s in specs
            }
            latencies: list[float] = []
            with client.stream() as multiplexed:
                for index in range(steps):
                    named = {
                        s.name: (
                            rng.standard_normal(shapes[s.name]).astype(s.dtype)
                            if s.dtype.kind == "f"
                            else np.zeros(shapes[s.name], s.dtype)
                        )
                        for s in specs
                    }
                    started = time.perf_counter()
                    multiplexed.step(session, **named)
                    latencies.append((time.perf_counter() - started) * 1e3)
                    typer.echo(
                        f"step {index + 1}: position {session.position} {latencies[-1]:.3f} ms"
                    )
            typer.echo(
                f"{steps} steps: median {statistics.median(latencies):.3f} ms, "
                f"max {max(latencies):.3f} ms"
            )
    except RnnserveError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _jsonable(output: Any) -> Any:
    if isinstance(output, dict):
        return {name: value.tolist() for name, value in output.items()}
    return output.tolist()
