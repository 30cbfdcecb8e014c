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


class Check(enum.StrEnum):
    server = "server"
    onnxruntime = "onnxruntime"
    none = "none"


config_app = typer.Typer(name="config", help="Write and check model configs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Attach the model commands to the ``rnnserve`` app."""
    app.command("train")(train)
    app.command("export")(export)
    app.command("build-defaults")(build_defaults)
    config_app.command("infer")(config_infer)
    app.add_typer(config_app)


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
    select: Annotated[
        bool,
        typer.Option(
            help="forecast: first pick hidden size and epochs on the validation years "
            "(1900-1949), as the defaults were picked."
        ),
    ] = False,
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
            if select:
                from .training import select_forecaster

                forecaster, scores = select_forecaster(forecaster)
                for (hidden_, epochs_), mae in scores.items():
                    typer.echo(f"validation MAE {mae:6.2f}: hidden {hidden_:>3}, epochs {epochs_}")
                typer.echo(f"chosen: hidden {forecaster.hidden_size}, epochs {forecaster.epochs}")
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
    source: Annotated[
        str,
        typer.Argument(
            help="A checkpoint from `rnnserve train` / save_checkpoint(), or a factory "
            "'package.module:function' or 'path/to/file.py:function' returning "
            "(module, example_inputs) or (module, example_inputs, export_options)."
        ),
    ],
    repository: Annotated[Path, typer.Option(help="Model repository to write into.")] = Path(
        "model_repository"
    ),
    name: Annotated[str, typer.Option(help="Model name (folder) in the repository.")] = "",
    version: Annotated[
        int | None, typer.Option(help="Version number; default: the next free one.")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text for the model's config.")] = "",
    output_name: Annotated[
        str, typer.Option(help="Name of the readout output (checkpoints).")
    ] = "y",
    check: Annotated[
        Check,
        typer.Option(
            help="Parity check before anything is written: 'server' steps a real server one "
            "timestep per call against torch's whole sequence (after onnxruntime's checks)."
        ),
    ] = Check.server,
) -> None:
    """Export a PyTorch recurrent model to ONNX + config.toml in a repository, parity-checked."""
    from .export import ExportError
    from .export import export as export_module

    try:
        module, example, options = _load_source(source)
        options.setdefault("description", description)
        if source.endswith((".pt", ".pth")) or Path(source).is_file():
            options.setdefault("output_names", [output_name])
        result = export_module(
            module,
            example,
            repository,
            name or _default_name(source),
            version=version,
            check=check.value,
            **options,
        )
    except (ExportError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(f"exported {result.kind} model: {result.model_path}")
    typer.echo(f"config: {result.config_path}")
    for label, error in result.parity.items():
        typer.echo(f"parity: {label}: scaled error {error:.1e} (tolerance 1e-05)")


def _default_name(source: str) -> str:
    if ":" in source and not Path(source).is_file():
        return source.rsplit(":", 1)[1]
    return Path(source).stem


def _load_source(source: str) -> tuple[object, object, dict[str, object]]:
    """(module, example inputs, export options) from a checkpoint or a factory."""
    import importlib
    import importlib.util

    import torch

    if Path(source).is_file():
        from .network import load_checkpoint

        model = load_checkpoint(Path(source))
        spec = model.spec
        if spec.tokens:
            example = torch.zeros(4, 2, dtype=torch.int64)
        else:
            example = torch.zeros(4, 2, spec.input_size)
        return model, example, {}
    if ":" not in source:
        raise ValueError(f"{source}: no such checkpoint file, and not 'module:function'")
    where, function = source.rsplit(":", 1)
    if where.endswith(".py"):
        spec_ = importlib.util.spec_from_file_location(Path(where).stem, where)
        if spec_ is None or spec_.loader is None:
            raise ValueError(f"{where}: cannot import this file")
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    made = getattr(module, function)()
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise ValueError(
            f"{source} must return (module, example_inputs) or (module, example_inputs, options)"
        )
    return made[0], made[1], dict(made[2]) if len(made) == 3 else {}


def config_infer(
    model: Annotated[Path, typer.Argument(help="The ONNX graph, e.g. repo/mine/1/model.onnx.")],
    output: Annotated[
        Path | None,
        typer.Option(
            help="Where to write; default: config.toml of the model's folder (the folder "
            "above a version folder)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing config.toml.")] = False,
    time_major: Annotated[
        bool,
        typer.Option(
            help="Rewrite the graph's layout = 1 recurrent nodes as layout = 0 between "
            "transposes (onnxruntime's CPU kernels refuse layout = 1); same config."
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option(help="Load the result as the server would, with its check run.")
    ] = True,
) -> None:
    """Write the config.toml that serves an ONNX recurrent graph, by reading the graph.

    Exit status 0: written and (with --check) loaded as the server loads it; 1: written, but
    fields listed on stderr must be filled in; 2: nothing usable was written.
    """
    import onnx

    from .graph import batch_first_nodes, infer_config, to_time_major
    from .repository import _atomic_write

    if not model.is_file():
        typer.echo(f"error: {model}: no such file", err=True)
        raise typer.Exit(code=2)
    if output is None:
        folder = model.parent.parent if model.parent.name.isdigit() else model.parent
        output = folder / "config.toml"
    if output.exists() and not force:
        typer.echo(f"error: {output} exists (use --force to replace it)", err=True)
        raise typer.Exit(code=2)
    try:
        proto = onnx.load(str(model))
    except Exception as exc:  # onnx raises several kinds for a file that is not a model
        typer.echo(f"error: {model}: not an ONNX model ({exc.__class__.__name__})", err=True)
        raise typer.Exit(code=2) from None
    batch_first = batch_first_nodes(proto)
    if batch_first and time_major:
        proto = to_time_major(proto)
        _atomic_write(model, proto.SerializeToString())
        typer.echo(f"rewrote {model}: {batch_first} now layout = 0 between transposes")
    inferred = infer_config(proto)
    _atomic_write(output, inferred.text.encode("utf-8"))
    typer.echo(f"wrote {output}")
    for note in inferred.notes:
        typer.echo(f"note: {note}", err=True)
    if batch_first and not time_major:
        typer.echo(
            f"note: nodes {batch_first} have layout = 1, which onnxruntime's CPU kernels refuse; "
            "rerun with --time-major to rewrite the graph (inputs, outputs and config unchanged)",
            err=True,
        )
    if inferred.todo:
        typer.echo(f"fill in before serving ({output}):", err=True)
        for item in inferred.todo:
            typer.echo(f"  {item}", err=True)
        raise typer.Exit(code=1)
    if check and not (batch_first and not time_major):
        from rnnserve.server.config import load_model_config
        from rnnserve.server.errors import ConfigError
        from rnnserve.server.runtime import check_graph, create_session

        try:
            config = load_model_config(output)
            session = create_session(model, ["CPUExecutionProvider"])
            check_graph(output, model, config, session)
        except ConfigError as exc:
            typer.echo(f"error: the server would refuse it: {exc}", err=True)
            raise typer.Exit(code=2) from None
        typer.echo("checked: the server loads it (graph cross-check and a check run)")


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
