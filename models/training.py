"""Train the two kinds of default model and score them against a trivial baseline on held-out data.

- Character language model: truncated backpropagation through time over parallel streams of
  Python source (torch's own, pinned; see data.py), the state carried from chunk to chunk as
  the server carries it between steps. Score: bits per character on the held-out tail vs the
  unigram entropy.
- Forecaster: one-step-ahead prediction of the yearly sunspot numbers. Score: mean absolute
  error on the held-out years vs persistence (``x_{t+1} = x_t``).

Both are seeded; the same seed on the same machine gives the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor, nn

from .cells import State
from .data import VOCABULARY, Series, sunspots, text_corpus, unigram_entropy_bits
from .network import ModelSpec, SequenceModel

#: Called as ``progress(done, total, loss)`` after each optimiser step.
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Report:
    """What a training run achieved, on data it never trained on."""

    task: str
    kind: str
    data: str
    metric: str
    heldout: float
    baseline: float
    baseline_name: str
    train_seconds: float
    parameters: int
    settings: dict[str, object]
    #: Stronger references on the same held-out data (name → score), reported beside it.
    references: dict[str, float] = field(default_factory=dict)

    @property
    def beats_baseline(self) -> bool:
        return self.heldout < self.baseline

    def summary(self) -> str:
        verdict = "beats" if self.beats_baseline else "does NOT beat"
        others = "".join(f", {name} {score:.3f}" for name, score in self.references.items())
        return (
            f"{self.task} ({self.kind}): held-out {self.metric} {self.heldout:.3f} vs "
            f"{self.baseline_name} {self.baseline:.3f} ({verdict} the baseline{others}); "
            f"{self.parameters:,} parameters, trained in {self.train_seconds:.1f} s on {self.data}"
        )

    def metadata(self) -> dict[str, str]:
        """Strings for config.toml's [metadata], so clients see how the model was scored."""
        return {"report": json.dumps(asdict(self), sort_keys=True)}


def _detach(state: State) -> State:
    if isinstance(state, tuple):
        return (state[0].detach(), state[1].detach())
    return state.detach()


def _descend(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    loss: Tensor,
) -> None:
    """One optimiser step; gradients clipped to norm 1 (recurrent nets explode without it)."""
    optimiser.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    schedule.step()


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class CharLMSettings:
    kind: str = "lstm"
    hidden_size: int = 192
    embedding_size: int = 32
    num_layers: int = 1
    streams: int = 32
    chunk: int = 96
    steps: int = 500
    learning_rate: float = 4e-3
    max_chars: int = 1_200_000
    heldout_fraction: float = 0.05
    seed: int = 0


def _streams(tokens: np.ndarray, streams: int) -> Tensor:
    """The token stream cut into ``streams`` contiguous rows, as a (time, streams) tensor."""
    length = len(tokens) // streams
    return torch.from_numpy(tokens[: length * streams].reshape(streams, length).T.copy())


@torch.no_grad()
def bits_per_char(
    model: SequenceModel, tokens: np.ndarray, streams: int = 16, chunk: int = 512
) -> float:
    """Mean cross-entropy in bits of predicting each next character, state carried throughout."""
    model.eval()
    data = _streams(tokens, streams)
    state: State | None = None
    total, count = 0.0, 0
    for start in range(0, data.shape[0] - 1, chunk):
        x = data[start : start + chunk]
        y = data[start + 1 : start + chunk + 1]
        x = x[: y.shape[0]]
        logits, state = model(x, state)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += y.numel()
    return total / count / math.log(2)


def train_charlm(
    settings: CharLMSettings = CharLMSettings(), progress: Progress | None = None
) -> tuple[SequenceModel, Report]:
    """A character-level language model on Python source text (data.text_corpus)."""
    torch.manual_seed(settings.seed)
    corpus = text_corpus(settings.max_chars)
    train, heldout = corpus.split(settings.heldout_fraction)
    spec = ModelSpec(
        kind=settings.kind,
        hidden_size=settings.hidden_size,
        output_size=len(VOCABULARY),
        vocab_size=len(VOCABULARY),
        embedding_size=settings.embedding_size,
        num_layers=settings.num_layers,
        metadata={"task": "charlm", "vocabulary": json.dumps(list(VOCABULARY))},
    )
    model = SequenceModel(spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps)
    data = _streams(train, settings.streams)
    started = time.perf_counter()
    state: State | None = None
    position = 0
    model.train()
    for step in range(settings.steps):
        if position + settings.chunk + 1 > data.shape[0]:
            position, state = 0, None
        x = data[position : position + settings.chunk]
        y = data[position + 1 : position + settings.chunk + 1]
        position += settings.chunk
        logits, state = model(x, state)
        state = _detach(state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        _descend(model, optimiser, schedule, loss)
        if progress is not None:
            progress(step + 1, settings.steps, loss.item() / math.log(2))
    seconds = time.perf_counter() - started
    report = Report(
        task="charlm",
        kind=settings.kind,
        data=(
            f"{len(corpus.tokens):,} characters of {corpus.files} files of {corpus.source} "
            f"(sha256 {corpus.sha256[:12]}), last {settings.heldout_fraction:.0%} held out"
        ),
        metric="bits/char",
        heldout=bits_per_char(model, heldout),
        baseline=unigram_entropy_bits(train, heldout, len(VOCABULARY)),
        baseline_name="unigram entropy",
        train_seconds=seconds,
        parameters=_parameters(model),
        settings=asdict(settings),
    )
    return model.eval(), report


@dataclass(frozen=True)
class ForecasterSettings:
    """A forecaster's training; years from ``heldout_from_year`` on are never trained on.

    ``hidden_size`` and ``epochs`` are the choices :func:`select_forecaster` makes on the
    validation years (``validation_from_year`` up to ``heldout_from_year``); the defaults
    per cell kind are recorded in :mod:`rnnserve.models.defaults`.
    """

    kind: str = "gru"
    hidden_size: int = 24
    num_layers: int = 1
    epochs: int = 200
    learning_rate: float = 1e-2
    heldout_from_year: int = 1950
    validation_from_year: int = 1900
    seed: int = 0


@dataclass(frozen=True)
class Scaling:
    """``scaled = (value - mean) / std``; clients apply it to inputs and undo it on outputs."""

    mean: float
    std: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std

    def undo(self, values: np.ndarray) -> np.ndarray:
        return values * self.std + self.mean

    def to_json(self) -> str:
        return json.dumps({"mean": self.mean, "std": self.std})


@torch.no_grad()
def one_step_forecasts(model: SequenceModel, series: np.ndarray, scaling: Scaling) -> np.ndarray:
    """Forecast of ``series[t + 1]`` made after seeing ``series[: t + 1]``, for every t."""
    model.eval()
    x = torch.from_numpy(scaling.apply(series).astype(np.float32)).reshape(-1, 1, 1)
    y, _ = model(x)
    return scaling.undo(y.reshape(-1).numpy().astype(np.float64))


def _mae_over(
    forecasts: np.ndarray, series: Series, first_year: int, until_year: float = math.inf
) -> float:
    """MAE of one-step forecasts (``forecasts[t]`` of ``values[t + 1]``) over target years."""
    years = series.years[1:]
    chosen = (years >= first_year) & (years < until_year)
    return float(np.mean(np.abs(forecasts[: len(years)][chosen] - series.values[1:][chosen])))


def forecast_scores(
    model: SequenceModel, series: Series, scaling: Scaling, first_year: int
) -> tuple[float, float]:
    """Held-out MAE of the model and of persistence, over targets from ``first_year`` on."""
    forecasts = one_step_forecasts(model, series.values, scaling)[:-1]
    return (
        _mae_over(forecasts, series, first_year),
        _mae_over(series.values[:-1], series, first_year),
    )


def ar_forecasts(series: Series, order: int, fit_until_year: int) -> np.ndarray:
    """Least-squares AR(``order``) with intercept, fitted on targets before ``fit_until_year``.

    Returns one-step forecasts aligned like :func:`one_step_forecasts` (``[t]`` forecasts
    ``values[t + 1]``); the first ``order - 1`` have too little history and are NaN.
    """
    values = series.values
    rows = np.array(
        [np.r_[1.0, values[t - order + 1 : t + 1][::-1]] for t in range(order - 1, len(values))]
    )
    forecasts = np.full(len(values), np.nan)
    targets_at = np.arange(order, len(values))  # rows[:-1] predict these
    fit = series.years[targets_at] < fit_until_year
    coefficients, *_ = np.linalg.lstsq(rows[:-1][fit], values[targets_at][fit], rcond=None)
    forecasts[order - 1 :] = rows @ coefficients
    return forecasts


def select_ar_order(
    series: Series, settings: ForecasterSettings, orders: range = range(1, 13)
) -> int:
    """The AR order with the lowest MAE on the validation years, fitted before them."""
    scores = {
        p: _mae_over(
            ar_forecasts(series, p, settings.validation_from_year),
            series,
            settings.validation_from_year,
            settings.heldout_from_year,
        )
        for p in orders
    }
    return min(scores, key=lambda p: scores[p])


def _fit_forecaster(
    settings: ForecasterSettings, series: Series, train_until_year: int, progress: Progress | None
) -> tuple[SequenceModel, Scaling, float]:
    """Train on the years before ``train_until_year``; the model, its scaling, seconds taken."""
    torch.manual_seed(settings.seed)
    train_values = series.values[series.years < train_until_year]
    scaling = Scaling(float(train_values.mean()), float(train_values.std()))
    spec = ModelSpec(
        kind=settings.kind,
        hidden_size=settings.hidden_size,
        output_size=1,
        input_size=1,
        num_layers=settings.num_layers,
        metadata={
            "task": "forecast",
            "scaling": scaling.to_json(),
            "series": series.name,
        },
    )
    model = SequenceModel(spec)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.epochs)
    scaled = torch.from_numpy(scaling.apply(train_values).astype(np.float32)).reshape(-1, 1, 1)
    x, y = scaled[:-1], scaled[1:]
    started = time.perf_counter()
    model.train()
    for epoch in range(settings.epochs):
        prediction, _ = model(x)
        loss = nn.functional.mse_loss(prediction, y)
        _descend(model, optimiser, schedule, loss)
        if progress is not None:
            progress(epoch + 1, settings.epochs, loss.item())
    return model.eval(), scaling, time.perf_counter() - started


#: The grid :func:`select_forecaster` searches (hidden units × epochs).
SELECTION_GRID: tuple[tuple[int, int], ...] = tuple(
    (hidden, epochs) for hidden in (8, 16, 24, 32) for epochs in (100, 200, 400)
)


def select_forecaster(
    settings: ForecasterSettings,
    grid: tuple[tuple[int, int], ...] = SELECTION_GRID,
) -> tuple[ForecasterSettings, dict[tuple[int, int], float]]:
    """Pick ``hidden_size`` and ``epochs`` on the validation years, never the held-out ones.

    Each candidate trains on the years before ``validation_from_year`` and is scored (MAE,
    state carried from the first year) on ``validation_from_year`` ≤ year <
    ``heldout_from_year``. Returns the best settings and every candidate's validation MAE.
    """
    series = sunspots()
    scores: dict[tuple[int, int], float] = {}
    for hidden, epochs in grid:
        candidate = replace(settings, hidden_size=hidden, epochs=epochs)
        model, scaling, _ = _fit_forecaster(candidate, series, settings.validation_from_year, None)
        forecasts = one_step_forecasts(model, series.values, scaling)[:-1]
        scores[(hidden, epochs)] = _mae_over(
            forecasts, series, settings.validation_from_year, settings.heldout_from_year
        )
    hidden, epochs = min(scores, key=lambda key: scores[key])
    return replace(settings, hidden_size=hidden, epochs=epochs), scores


def train_forecaster(
    settings: ForecasterSettings = ForecasterSettings(), progress: Progress | None = None
) -> tuple[SequenceModel, Report]:
    """A one-step-ahead forecaster of the yearly sunspot numbers, scored on the held-out years.

    Reported beside persistence (the baseline it must beat): a least-squares AR(p) fitted on
    the same training years, its order p chosen on the validation years.
    """
    series = sunspots()
    model, scaling, seconds = _fit_forecaster(
        settings, series, settings.heldout_from_year, progress
    )
    model_mae, persistence = forecast_scores(model, series, scaling, settings.heldout_from_year)
    order = select_ar_order(series, settings)
    ar_mae = _mae_over(
        ar_forecasts(series, order, settings.heldout_from_year), series, settings.heldout_from_year
    )
    report = Report(
        task="forecast",
        kind=settings.kind,
        data=f"{series.name}, years from {settings.heldout_from_year} held out",
        metric="MAE (sunspot number)",
        heldout=model_mae,
        baseline=persistence,
        baseline_name="persistence",
        train_seconds=seconds,
        parameters=_parameters(model),
        settings=asdict(settings),
        references={f"least-squares AR({order})": ar_mae},
    )
    return model, report
