"""The default model repository that ``make models``, the demo, the tests and the benchmarks serve.

One trained model per cell kind, plus the language model the demo generates text with:

- ``charlm``: character-level LSTM language model on Python source (torch's own, pinned);
- ``sunspots_<kind>``: a one-step-ahead forecaster of the yearly sunspot numbers for each of
  ``rnn``, ``lstm``, ``peephole_lstm``, ``gru`` (the paper's) and ``gru_torch``.

Every model must beat its baseline on held-out data or the build fails: a repository of models
that do not work is worse than none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .cells import CELLS
from .network import SequenceModel, save_checkpoint
from .repository import write_model
from .training import (
    CharLMSettings,
    ForecasterSettings,
    Progress,
    Report,
    train_charlm,
    train_forecaster,
)

#: Settings of the default build: about 1.5 minutes on 2 CPU cores.
CHARLM = CharLMSettings(hidden_size=256, chunk=128, steps=1200, max_chars=2_000_000)
FORECASTER = ForecasterSettings()
#: (hidden_size, epochs) per cell kind, as ``select_forecaster`` picked them on the validation
#: years 1900-1949 (trained on 1700-1899) from ``SELECTION_GRID``; the held-out years
#: 1950-2008 played no part. ``rnnserve train forecast --select`` runs the search again.
SELECTED: dict[str, tuple[int, int]] = {
    "rnn": (24, 100),  # validation MAE 9.95
    "lstm": (32, 100),  # 8.88
    "peephole_lstm": (32, 100),  # 9.05
    "gru": (32, 100),  # 8.39
    "gru_torch": (24, 100),  # 8.82
}
#: A much shorter build for quick checks; the models still beat their baselines.
QUICK_CHARLM = replace(CHARLM, hidden_size=128, steps=250, max_chars=600_000)
QUICK_FORECASTER = replace(FORECASTER, epochs=100)

#: The serving limits written into the default configs: a lone interactive session should not
#: wait long for others to batch with.
LIMITS = {"max_queue_delay_us": 500}

#: Folder of the repository holding each default model's checkpoint.
CHECKPOINTS = ".checkpoints"

Job = Callable[[Progress | None], tuple[SequenceModel, Report]]


def default_jobs(quick: bool = False) -> dict[str, tuple[str, Job]]:
    """Model name → (description, training job)."""
    charlm = QUICK_CHARLM if quick else CHARLM
    forecaster = QUICK_FORECASTER if quick else FORECASTER
    jobs: dict[str, tuple[str, Job]] = {
        "charlm": (
            "character-level LSTM language model trained on Python source (torch.nn, torch.optim)",
            lambda progress: train_charlm(charlm, progress),
        )
    }
    for kind in CELLS:
        settings = replace(forecaster, kind=kind)
        if not quick:
            hidden, epochs = SELECTED[kind]
            settings = replace(settings, hidden_size=hidden, epochs=epochs)
        jobs[f"sunspots_{kind}"] = (
            f"{kind} forecaster of the yearly sunspot number, one year ahead",
            _forecaster_job(settings),
        )
    return jobs


def _forecaster_job(settings: ForecasterSettings) -> Job:
    return lambda progress: train_forecaster(settings, progress)


class BaselineNotBeaten(RuntimeError):
    """A trained model scored no better than the trivial baseline on held-out data."""


def build_defaults(
    repository: Path,
    quick: bool = False,
    progress_for: Callable[[str], Progress | None] = lambda name: None,
) -> dict[str, Report]:
    """Train every default model, check it against its baseline, write it as version 1."""
    reports: dict[str, Report] = {}
    for name, (description, job) in default_jobs(quick).items():
        model, report = job(progress_for(name))
        if not report.beats_baseline:
            raise BaselineNotBeaten(report.summary())
        # The trained module beside the graph (in a dot folder, which the server skips), so
        # the served files can be checked against torch (tests/models/test_default_parity.py).
        save_checkpoint(model, Path(repository) / CHECKPOINTS / f"{name}.pt")
        write_model(
            repository,
            name,
            model,
            version=1,
            description=description,
            metadata=report.metadata(),
            limits=LIMITS,
            output_name="logits" if report.task == "charlm" else "y",
        )
        reports[name] = report
    return reports
