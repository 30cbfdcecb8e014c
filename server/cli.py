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


# Each part that is installed contributes its commands through a ``register(app)`` function.
_COMMAND_MODULES = (
    "rnnserve.server.commands",  # serve, models
    "rnnserve.bench.commands",  # bench
    "rnnserve.client.commands",  # step, stream
    "rnnserve.models.commands",  # train, export, build-defaults
)


def _register() -> None:
    """Attach the sub-commands of each part that is installed."""
    import importlib

    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # Only a missing part (or its extra) is skipped; a bug inside a part is raised.
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.register(app)
