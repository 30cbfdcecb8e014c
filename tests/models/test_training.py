"""Training beats a trivial baseline on held-out data, and the same seed gives the same model.

These train with the short settings of ``build-defaults --quick``; the default models' own
scores are checked on their exported files in ``test_default_repository.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from rnnserve.models.cells import CELLS
from rnnserve.models.data import (
    CORPUS_SHA256,
    VOCABULARY,
    decode,
    encode,
    sunspots,
    text_corpus,
    unigram_entropy_bits,
)
from rnnserve.models.defaults import QUICK_CHARLM, QUICK_FORECASTER
from rnnserve.models.training import train_charlm, train_forecaster


def test_character_model_beats_the_unigram_entropy_on_held_out_text() -> None:
    steps: list[int] = []
    model, report = train_charlm(
        QUICK_CHARLM, progress=lambda done, total, loss: steps.append(done)
    )
    assert steps == list(range(1, QUICK_CHARLM.steps + 1))
    assert report.metric == "bits/char" and report.baseline_name == "unigram entropy"
    assert 1.0 < report.heldout < report.baseline, report.summary()
    assert "beats the baseline" in report.summary()
    assert model.spec.metadata["task"] == "charlm"


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_forecaster_beats_persistence_on_held_out_years(kind: str) -> None:
    model, report = train_forecaster(replace(QUICK_FORECASTER, kind=kind))
    assert model.spec.kind == kind
    assert report.baseline_name == "persistence"
    assert report.heldout < report.baseline, report.summary()


def test_the_same_seed_gives_the_same_model_and_another_seed_another() -> None:
    settings = replace(QUICK_FORECASTER, kind="lstm", epochs=20)
    first, _ = train_forecaster(settings)
    again, _ = train_forecaster(settings)
    other, _ = train_forecaster(replace(settings, seed=1))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_the_corpus_is_the_same_on_every_interpreter_and_round_trips_the_vocabulary() -> None:
    """torch's pinned source, not this Python's standard library (which differs per version)."""
    assert torch.__version__.split("+")[0] == "2.13.0", "the corpus digest is torch 2.13.0's"
    assert text_corpus().sha256 == CORPUS_SHA256
    corpus = text_corpus(max_chars=200_000)
    assert len(corpus.tokens) == 200_000 and corpus.files >= 1
    assert corpus.tokens.max() < len(VOCABULARY)
    text = "def f(x):\n\treturn x  # é"
    assert decode(encode(text)) == "def f(x):\n return x  # ?"


def test_unigram_baseline_is_the_entropy_of_the_character_frequencies() -> None:
    uniform = np.tile(np.arange(4), 1000)
    assert math.isclose(unigram_entropy_bits(uniform, uniform, vocab=4), 2.0, rel_tol=1e-9)
    skewed = np.array([0] * 900 + [1] * 100)
    expected = -(0.9 * math.log2(901 / 1002) + 0.1 * math.log2(101 / 1002))
    assert math.isclose(unigram_entropy_bits(skewed, skewed, vocab=2), expected, rel_tol=1e-9)


def test_the_sunspot_series_ships_with_statsmodels() -> None:
    series = sunspots()
    assert series.years[0] == 1700 and len(series.values) == 309
    assert np.all(series.values >= 0)


def test_ar_reference_and_selection_use_no_held_out_year(monkeypatch: pytest.MonkeyPatch) -> None:
    """AR(9) fitted on 1700-1949 scores MAE 14.4 on 1950-2008; the choices of AR order and of
    the forecasters' hidden size and epochs are the same when the held-out years are NaN."""
    from rnnserve.models import training

    series = sunspots()
    ar9 = training.ar_forecasts(series, 9, fit_until_year=1950)
    assert round(training._mae_over(ar9, series, 1950), 1) == 14.4
    settings = training.ForecasterSettings(kind="lstm")
    grid = ((8, 30), (16, 30))
    order = training.select_ar_order(series, settings)
    chosen, scores = training.select_forecaster(settings, grid)
    hidden = replace(series, values=np.where(series.years >= 1950, np.nan, series.values))
    monkeypatch.setattr(training, "sunspots", lambda: hidden)
    assert training.select_ar_order(hidden, settings) == order
    assert training.select_forecaster(settings, grid) == (chosen, scores)
    assert all(np.isfinite(list(scores.values())))
