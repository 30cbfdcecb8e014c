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
    VOCABULARY,
    decode,
    encode,
    stdlib_corpus,
    sunspots,
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


def test_the_corpus_is_read_from_this_python_and_round_trips_through_the_vocabulary() -> None:
    corpus = stdlib_corpus(max_chars=200_000)
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
