"""The default repository (``rnnserve build-defaults``): one model per cell kind, and every exported
file beats its baseline when scored again here, with onnxruntime, on the held-out data.

The scores are recomputed from the ONNX files (not read back from the training report), so
this checks what the server actually serves.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from rnnserve.models.data import VOCABULARY, sunspots, text_corpus, unigram_entropy_bits
from rnnserve.models.training import (
    ForecasterSettings,
    _mae_over,
    ar_forecasts,
    select_ar_order,
)


def _session(repository: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _config(repository: Path, name: str) -> dict:
    return tomllib.loads((repository / name / "config.toml").read_text(encoding="utf-8"))


def _report(config: dict) -> dict:
    return json.loads(config["metadata"]["report"])


def test_every_cell_kind_is_served_by_a_default_model(default_repository: Path) -> None:
    kinds = {
        _config(default_repository, p.name)["cell_kind"]
        for p in default_repository.iterdir()
        if (p / "config.toml").exists()
    }
    assert kinds == {"rnn", "lstm", "peephole_lstm", "gru", "gru_torch"}
    charlm = _config(default_repository, "charlm")
    assert charlm["metadata"]["task"] == "charlm"
    assert json.loads(charlm["metadata"]["vocabulary"]) == list(VOCABULARY)
    # Token ids are refused outside the embedding's rows (a Gather reads -1 as the last row).
    assert charlm["inputs"][0]["range"] == [0, len(VOCABULARY) - 1]


def test_language_model_file_beats_the_unigram_entropy(default_repository: Path) -> None:
    config = _config(default_repository, "charlm")
    settings = _report(config)["settings"]
    corpus = text_corpus(settings["max_chars"])
    train, heldout = corpus.split(settings["heldout_fraction"])
    session = _session(default_repository, "charlm")
    streams, chunk = 8, 512
    length = len(heldout) // streams
    data = heldout[: length * streams].reshape(streams, length).T
    layers_hidden = config["states"][0]["shape"]
    state = {
        s["input"]: np.zeros((layers_hidden[0], streams, layers_hidden[2]), np.float32)
        for s in config["states"]
    }
    outputs = ["logits", *(s["output"] for s in config["states"])]
    nats, count = 0.0, 0
    for start in range(0, length - 1, chunk):
        x = data[start : start + chunk]
        y = data[start + 1 : start + chunk + 1]
        logits, *finals = session.run(outputs, {"tokens": np.ascontiguousarray(x), **state})
        logits = logits[: len(y)].astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        picked = np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        nats += float((log_z - picked).sum())
        count += y.size
        state = {s["input"]: f for s, f in zip(config["states"], finals, strict=True)}
    bits = nats / count / math.log(2)
    baseline = unigram_entropy_bits(train, heldout, len(VOCABULARY))
    assert bits < baseline, f"held-out {bits:.3f} bits/char vs unigram {baseline:.3f}"
    # The training report measured the same thing in PyTorch (other stream count: close, not equal).
    assert abs(bits - _report(config)["heldout"]) < 0.1


@pytest.mark.parametrize("kind", ["rnn", "lstm", "peephole_lstm", "gru", "gru_torch"])
def test_forecaster_file_beats_persistence(default_repository: Path, kind: str) -> None:
    name = f"sunspots_{kind}"
    config = _config(default_repository, name)
    scaling = json.loads(config["metadata"]["scaling"])
    first_year = _report(config)["settings"]["heldout_from_year"]
    series = sunspots()
    x = ((series.values - scaling["mean"]) / scaling["std"]).astype(np.float32).reshape(-1, 1, 1)
    state = {
        s["input"]: np.zeros([d if d != -1 else 1 for d in s["shape"]], np.float32)
        for s in config["states"]
    }
    (y,) = _session(default_repository, name).run(["y"], {"x": x, **state})
    forecasts = y.reshape(-1)[:-1] * scaling["std"] + scaling["mean"]
    targets = series.values[1:]
    heldout = series.years[1:] >= first_year
    mae = float(np.mean(np.abs(forecasts[heldout] - targets[heldout])))
    persistence = float(np.mean(np.abs(series.values[:-1][heldout] - targets[heldout])))
    assert mae < persistence, f"{name}: MAE {mae:.2f} vs persistence {persistence:.2f}"
    assert math.isclose(mae, _report(config)["heldout"], rel_tol=1e-4)
    # The AR(p) reference beside it: order chosen on the validation years, fitted on the
    # training years, scored on the same held-out years.
    settings = ForecasterSettings(**_report(config)["settings"])
    order = select_ar_order(series, settings)
    ar = _mae_over(ar_forecasts(series, order, first_year), series, first_year)
    assert _report(config)["references"] == {f"least-squares AR({order})": ar}


def test_the_stream_command_tries_the_token_model(default_repository: Path) -> None:
    # It used to send random normals cast to int64 (token -1: refused at step 10).
    import subprocess
    import sys

    from rnnserve.testing import ServerProcess

    with ServerProcess(default_repository) as server:
        done = subprocess.run(
            [
                sys.executable, "-c", "from rnnserve.server.cli import main; main()", "stream",
                "--target", server.address, "--model", "charlm", "--steps", "12",
            ],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "12 steps: median" in done.stdout
