"""``rnnserve train``, ``rnnserve export`` and ``rnnserve build-defaults``.

torch is imported inside the commands only, so ``rnnserve --help`` stays fast and a server-only
install (no ``[train]`` extra) simply lacks these commands' dependencies, not the CLI.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from .training import Progress, Report


class Task(enum.StrEnum):
    charlm = "charlm"
    forecast = "forecast"


class Kind(enum.StrEnum):
    rnn = "rnn"
    lstm = "lstm"
    peephole_lstm = "peephole_lstm"
    gru = "gru"
    gru_torch = "gru_torch"


def register(app: typer.Typer) -> None:
    """Attach the model commands to the ``rnnserve`` app."""
    app.command("train")(train)
    app.command("export")(export)
    app.command("build-defaults")(build_defaults)


@contextmanager
def _progress_bars() -> Iterator[object]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
    ) as bars:
        yield bars


def _callback(bars: object, description: str) -> Progress:
    from rich.progress import Progress as RichProgress

    assert isinstance(bars, RichProgress)
    task = bars.add_task(description, total=None, loss=float("nan"))

    def update(done: int, total: int, loss: float) -> None:
        bars.update(task, completed=done, total=total, loss=loss)

    return update


def _print_report(report: Report) -> None:
    from rich.console import Console

    style = "green" if report.beats_baseline else "red"
    Console().print(f"[{style}]{report.summary()}[/{style}]")


def train(
    task: Annotated[Task, typer.Argument(help="charlm: character LM; forecast: sunspots.")],
    checkpoint: Annotated[Path, typer.Option(help="Where to save the trained model.")] = Path(
        "model.pt"
    ),
    kind: Annotated[
        Kind | None, typer.Option(help="Cell kind (default: lstm for charlm, gru for forecast).")
    ] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Hidden units per layer.")] = None,
    num_layers: Annotated[int, typer.Option(help="Stacked recurrent layers.")] = 1,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (charlm) or epochs (forecast).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same model.")] = 0,
    repository: Annotated[
        Path | None, typer.Option(help="Also export into this model repository.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name in the repository.")] = None,
) -> None:
    """Train a model on data already on this machine and report it against a baseline."""
    from dataclasses import replace

    from .network import save_checkpoint
    from .training import CharLMSettings, ForecasterSettings, train_charlm, train_forecaster

    changes: dict[str, object] = {"num_layers": num_layers, "seed": seed}
    if kind is not None:
        changes["kind"] = kind.value
    if hidden_size is not None:
        changes["hidden_size"] = hidden_size
    with _progress_bars() as bars:
        if task is Task.charlm:
            if steps is not None:
                changes["steps"] = steps
            settings = replace(CharLMSettings(), **changes)  # type: ignore[arg-type]
            model, report = train_charlm(settings, _callback(bars, "charlm"))
        else:
            if steps is not None:
                changes["epochs"] = steps
            forecaster = replace(ForecasterSettings(), **changes)  # type: ignore[arg-type]
            model, report = train_forecaster(forecaster, _callback(bars, "forecast"))
    _print_report(report)
    save_checkpoint(model, checkpoint)
    typer.echo(f"checkpoint: {checkpoint}")
    if repository is not None:
        from .repository import write_model

        path = write_model(
            repository,
            name or f"{task.value}_{model.spec.kind}",
            model,
            metadata=report.metadata(),
            output_name="logits" if task is Task.charlm else "y",
        )
        typer.echo(f"exported: {path}")
    if not report.beats_baseline:
        raise typer.Exit(code=1)


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint from `rnnserve train` or save_checkpoint().")
    ],
    repository: Annotated[Path, typer.Option(help="Model repository to write into.")] = Path(
        "model_repository"
    ),
    name: Annotated[str, typer.Option(help="Model name (folder) in the repository.")] = "",
    version: Annotated[
        int | None, typer.Option(help="Version number; default: the next free one.")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text for the model's config.")] = "",
    output_name: Annotated[str, typer.Option(help="Name of the readout output.")] = "y",
) -> None:
    """Export a trained model to ONNX (native recurrent nodes) into a model repository."""
    from .network import load_checkpoint
    from .repository import write_model

    if not checkpoint.is_file():
        raise typer.BadParameter(f"{checkpoint}: no such file", param_hint="CHECKPOINT")
    try:
        model = load_checkpoint(checkpoint)
        path = write_model(
            repository,
            name or checkpoint.stem,
            model,
            version=version,
            description=description,
            output_name=output_name,
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"exported {model.spec.kind} model: {path}")


def build_defaults(
    repository: Annotated[
        Path, typer.Option(help="Folder to write the default models into.")
    ] = Path("model_repository"),
    quick: Annotated[
        bool, typer.Option(help="Much shorter training (for quick checks; still beats baselines).")
    ] = False,
) -> None:
    """Train and export the default models: a character LM, a sunspot forecaster per cell."""
    from .defaults import BaselineNotBeaten
    from .defaults import build_defaults as build

    with _progress_bars() as bars:
        try:
            reports = build(
                repository,
                quick=quick,
                progress_for=lambda name: _callback(bars, name),
            )
        except BaselineNotBeaten as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from exc
    for name, report in reports.items():
        typer.echo(f"{name:<22} {report.summary()}")
    typer.echo(f"wrote {len(reports)} models to {repository}")
