"""The ``rnnserve`` command line.

Every sub-command imports its heavy dependencies lazily, so ``rnnserve --help`` is fast and
``rnnserve train`` works without the server extra (and ``serve`` without torch).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rnnserve",
    help="Serve recurrent neural networks with per-session state over gRPC.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()


def _register() -> None:
    """Attach the sub-commands of each part that is installed."""
    try:
        from rnnserve.server import commands as server_commands
    except ImportError:  # pragma: no cover - server extra missing
        pass
    else:
        server_commands.register(app)
    try:
        from rnnserve.models import commands as model_commands
    except ImportError:  # pragma: no cover - train extra missing
        pass
    else:
        model_commands.register(app)
