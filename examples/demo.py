"""``make demo``: serve a repository, stream from a client, stop the server cleanly.

It shows the one thing rnnserve is for: the server keeps each session's state, so a client can
send one timestep at a time and still get what the whole sequence would give. Trained models
with a ``task`` in their metadata get their own show (text generation, forecasting the sunspot
series year by year); any other model streams a seeded sequence step by step and checks it
against one ``Predict`` call.
If the repository is missing, the demo serves the hand-built models of every cell kind.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rnnserve.client import Client, ModelInfo, Session
from rnnserve.testing import ServerProcess, build_test_repository


def _timed_step(session: Session, x: np.ndarray) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    y = session.step(x)
    assert isinstance(y, np.ndarray)
    return y, (time.perf_counter() - start) * 1e6


def _charlm(client: Client, model: ModelInfo, prompt: str = "def ", length: int = 160) -> None:
    """Feed a prompt, then sample with temperature, one character (one Step) at a time."""
    vocabulary: list[str] = json.loads(model.metadata["vocabulary"])
    spec = model.data_inputs[0]
    rng = np.random.default_rng(0)
    text, latencies = [], []
    with client.open_session(model.name) as session:
        logits = np.zeros(len(vocabulary))
        for ch in "\n" + prompt:
            logits, _ = _timed_step(session, np.array([vocabulary.index(ch)], dtype=spec.dtype))
        for _ in range(length):
            p = np.exp((logits.reshape(-1) - logits.max()) / 0.8)
            token = int(rng.choice(len(p), p=p / p.sum()))
            text.append(vocabulary[token])
            logits, micros = _timed_step(session, np.array([token], dtype=spec.dtype))
            latencies.append(micros)
        print(f"[{model.name}] prompt {prompt!r}, then {length} characters one Step each:")
        print("  " + (prompt + "".join(text)).replace("\n", "\n  "))
        p50 = np.median(latencies)
        print(f"  session position {session.position}, per-step latency p50 {p50:.0f} µs")


def _forecasts(client: Client, models: list[ModelInfo], first_year: int = 1950) -> None:
    """Feed each forecaster the sunspot series one year per Step and score its forecasts."""
    try:
        from statsmodels.datasets import sunspots
    except ImportError:
        print("sunspot forecasters: statsmodels (the [train] extra) is not installed; skipped")
        return
    frame = sunspots.load_pandas().data
    years = frame["YEAR"].to_numpy(dtype=int)
    values = frame["SUNACTIVITY"].to_numpy(dtype=np.float64)
    print(f"sunspot forecasters: one Step per year, scored on {first_year}-{years[-1]}")
    print(f"  {'model':<24}{'MAE':>8}{'persistence':>13}{'p50 µs/step':>13}")
    shown = False
    for model in models:
        scaling = json.loads(model.metadata["scaling"])
        forecasts, latencies = [], []
        with client.open_session(model.name) as session:
            for value in values[:-1]:
                x = np.array([[(value - scaling["mean"]) / scaling["std"]]], dtype=np.float32)
                y, micros = _timed_step(session, x)
                forecasts.append(float(y.reshape(-1)[0]) * scaling["std"] + scaling["mean"])
                latencies.append(micros)
        held = years[1:] >= first_year
        errors = np.abs(np.array(forecasts) - values[1:])[held]
        persistence = np.abs(values[:-1] - values[1:])[held]
        print(
            f"  {model.name:<24}{errors.mean():>8.1f}{persistence.mean():>13.1f}"
            f"{np.median(latencies):>13.0f}"
        )
        if not shown:
            shown = True
            tail = list(zip(years[1:], values[1:], forecasts, strict=True))[-5:]
            sample = ", ".join(f"{y}: {v:.0f} (forecast {f:.0f})" for y, v, f in tail)
            print(f"    last years: {sample}")


def _stream_check(client: Client, model: ModelInfo, steps: int = 16) -> None:
    """Stream a seeded sequence step by step; it must equal the whole sequence run at once."""
    spec = model.data_inputs[0]
    feature_shape = [d for i, d in enumerate(spec.shape) if i != spec.time_axis]
    rng = np.random.default_rng(0)
    sequence = rng.normal(size=(steps, *feature_shape)).astype(spec.dtype)
    whole = client.predict(model.name, version=model.version, **{spec.name: sequence})
    expected = next(iter(whole.outputs.values()))
    with client.open_session(model.name, version=model.version) as session:
        outputs, latencies = [], []
        for t in range(steps):
            y, micros = _timed_step(session, sequence[t : t + 1])
            outputs.append(y)
            latencies.append(micros)
        got = np.concatenate(outputs, axis=0)
        error = float(np.abs(got - expected).max())
        print(
            f"[{model.name + '/' + model.version:<18}] {model.cell_kind:<14} {steps} single steps, "
            f"position {session.position}, max |stepwise - whole sequence| = {error:.1e}, "
            f"per-step p50 {np.median(latencies):.0f} µs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        repository: Path = args.repository
        if not (repository.is_dir() and any(repository.glob("*/config.toml"))):
            print(f"{repository} has no models; serving the hand-built model of every cell kind")
            # One client steps one session at a time: nothing to batch with, so wait for no one.
            repository = build_test_repository(
                Path(scratch) / "repository", limits={"max_queue_delay_us": 0}
            )
        with ServerProcess(repository) as server:
            print(f"rnnserve is serving {repository} on {server.address}")
            with Client(server.address) as client:
                forecasters = []
                for model in client.list_models():
                    task = model.metadata.get("task")
                    if task == "charlm" and "vocabulary" in model.metadata:
                        _charlm(client, model)
                    elif task == "forecast" and "scaling" in model.metadata:
                        forecasters.append(model)
                    else:
                        _stream_check(client, model)
                if forecasters:
                    _forecasts(client, forecasters)
            print("stopping the server (SIGTERM, graceful drain) ...")
        print(f"server exited with code {server.process.returncode}")


if __name__ == "__main__":
    main()
