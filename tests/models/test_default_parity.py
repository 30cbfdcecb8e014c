"""The trained default models as served equal the trained torch modules (their checkpoints).

Tolerances are honest about magnitude: errors are ``max |onnx - torch| / max(1, max |torch|)``
("scaled"), because the peephole forecaster's cell state grows far beyond 1 and float32 keeps
about 7 significant digits of it. The figures in models/README.md come from these tests
(run with ``-s`` to see them printed).

- Every forecaster and the language model on a grid of random inputs and states (T = 1, 7, 64;
  B = 1, 3, 16) and, for the forecasters, over the whole real series from a zero state.
- A long session: 10,000 one-year steps (the scaled series, over and over) streamed through
  a real server, against 10,000 single steps of the torch module, the state carried in each.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rnnserve.client import Client
from rnnserve.models.data import sunspots
from rnnserve.models.defaults import CHECKPOINTS
from rnnserve.models.export import scaled_error
from rnnserve.models.network import SequenceModel, load_checkpoint
from rnnserve.testing import ServerProcess

FORECASTERS = [
    "sunspots_rnn",
    "sunspots_lstm",
    "sunspots_peephole_lstm",
    "sunspots_gru",
    "sunspots_gru_torch",
]
#: Scaled error allowed between torch and onnxruntime on one run (the exporter's tolerance).
TOLERANCE = 1e-5
#: Allowed after 10,000 steps with the state carried: float32 rounding may accumulate.
DRIFT_TOLERANCE = 1e-4


def _load(repository: Path, name: str) -> tuple[SequenceModel, ort.InferenceSession, dict]:
    checkpoint = repository / CHECKPOINTS / f"{name}.pt"
    if not checkpoint.is_file():
        pytest.skip(f"{checkpoint}: rebuild the repository with this rnnserve build-defaults")
    session = ort.InferenceSession(
        str(repository / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    config = tomllib.loads((repository / name / "config.toml").read_text())
    return load_checkpoint(checkpoint), session, config


def _compare(
    model: SequenceModel,
    session: ort.InferenceSession,
    config: dict,
    x: np.ndarray,
    state: list[np.ndarray],
) -> dict[str, tuple[float, float]]:
    """Scaled error and largest |value| of every output, torch vs onnxruntime."""
    h = torch.from_numpy(state[0])
    initial = (h, torch.from_numpy(state[1])) if len(state) == 2 else h
    with torch.no_grad():
        y, final = model(torch.from_numpy(x), initial)
    finals = list(final) if isinstance(final, tuple) else [final]
    want = [y.numpy(), *(f.numpy() for f in finals)]
    names = [config["outputs"][0]["name"], *(s["output"] for s in config["states"])]
    feeds = {config["inputs"][0]["name"]: x}
    feeds.update({s["input"]: v for s, v in zip(config["states"], state, strict=True)})
    got = session.run(names, feeds)
    return {
        n: (scaled_error(g, w), float(np.abs(w).max()))
        for n, g, w in zip(names, got, want, strict=True)
    }


def _state_shapes(config: dict, batch: int) -> list[list[int]]:
    return [[batch if d == -1 else d for d in s["shape"]] for s in config["states"]]


@pytest.mark.parametrize("name", [*FORECASTERS, "charlm"])
def test_served_file_equals_the_trained_module(default_repository: Path, name: str) -> None:
    model, session, config = _load(default_repository, name)
    rng = np.random.default_rng(0)
    worst: dict[str, tuple[float, float]] = {}
    runs = []
    for T in (1, 7, 64):
        for B in (1, 3, 16):
            if model.spec.tokens:
                x = rng.integers(0, model.spec.vocab_size, (T, B)).astype(np.int64)
            else:
                x = (rng.standard_normal((T, B, 1)) * 2).astype(np.float32)
            state = [rng.standard_normal(s).astype(np.float32) for s in _state_shapes(config, B)]
            runs.append(("grid", x, state))
    if not model.spec.tokens:
        scaling = json.loads(config["metadata"]["scaling"])
        series = ((sunspots().values - scaling["mean"]) / scaling["std"]).astype(np.float32)
        zero = [np.zeros(s, np.float32) for s in _state_shapes(config, 1)]
        runs.append(("series", series.reshape(-1, 1, 1), zero))
    for label, x, state in runs:
        for output, (error, magnitude) in _compare(model, session, config, x, state).items():
            key = f"{label} {output}"
            old = worst.get(key, (0.0, 0.0))
            worst[key] = (max(old[0], error), max(old[1], magnitude))
    print(
        f"\n{name}: "
        + "; ".join(
            f"{k} scaled error {e:.1e} (max |value| {m:.3g})" for k, (e, m) in worst.items()
        )
    )
    for key, (error, _) in worst.items():
        assert error <= TOLERANCE, f"{name} {key}: scaled error {error:.2e}"


def test_long_session_does_not_drift(default_repository: Path) -> None:
    """10,000 steps through the server, one timestep each, vs 10,000 single torch steps."""
    name = "sunspots_peephole_lstm"
    model, _, config = _load(default_repository, name)
    scaling = json.loads(config["metadata"]["scaling"])
    series = ((sunspots().values - scaling["mean"]) / scaling["std"]).astype(np.float32)
    steps = 10_000
    x = np.resize(series, steps).reshape(steps, 1, 1)  # (T, 1 feature) per session, cycled
    want_y = np.empty(steps, np.float32)
    state = None
    with torch.no_grad():
        for t in range(steps):
            y, state = model(torch.from_numpy(x[t : t + 1, None, 0]), state)
            want_y[t] = float(y)
    with ServerProcess(default_repository) as server, Client(server.address) as client:
        with client.open_session(name) as session:
            got_y = np.array([float(np.ravel(out)[0]) for out in session.steps(iter(x), window=64)])
            final = session.export_state()
    assert final.position == steps
    errors = {"y": scaled_error(got_y, want_y)}
    h, c = state
    errors["h"] = scaled_error(final.state["initial_h"], h[:, 0].numpy())
    errors["c"] = scaled_error(final.state["initial_c"], c[:, 0].numpy())
    print(f"\n{name}, {steps} steps: scaled errors {errors}; max |c| {float(c.abs().max()):.3g}")
    for key, error in errors.items():
        assert error <= DRIFT_TOLERANCE, f"{key}: scaled error {error:.2e} after {steps} steps"
