"""Helpers shared by the SDK integration tests: reference outputs and output normalising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rnnserve.client import ModelInfo

TOLERANCE = 1e-5
MODELS = ["tiny_rnn", "tiny_lstm", "tiny_peephole", "tiny_gru", "tiny_gru_torch"]


def inputs_for(model: ModelInfo, timesteps: int, seed: int) -> np.ndarray:
    """Random per-session input of the model's only input, with ``timesteps`` on its time axis."""
    (spec,) = model.data_inputs
    shape = tuple(
        timesteps if axis == spec.time_axis else extent for axis, extent in enumerate(spec.shape)
    )
    return np.random.default_rng(seed).standard_normal(shape).astype(spec.dtype)


def as_dict(output: Any, model: ModelInfo) -> dict[str, np.ndarray]:
    """A step's result by output name, whether the model has one output or several."""
    if isinstance(output, dict):
        return output
    (spec,) = model.outputs
    return {spec.name: output}


def concat(chunks: list[dict[str, np.ndarray]], model: ModelInfo) -> dict[str, np.ndarray]:
    """Step results joined along each output's time axis."""
    return {
        spec.name: np.concatenate([chunk[spec.name] for chunk in chunks], axis=spec.time_axis)
        for spec in model.outputs
    }


def reference(
    testing: Any,
    repository: Path,
    model: ModelInfo,
    x: np.ndarray,
    initial_state: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Outputs of the whole sequence ``x`` run by onnxruntime directly, outside the server."""
    (spec,) = model.data_inputs
    outputs = testing.run_reference(
        repository, model.name, model.version, {spec.name: x}, initial_state=initial_state
    )
    return {spec.name: np.asarray(outputs[spec.name]) for spec in model.outputs}


def assert_outputs_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """Every output equal to the reference within the agreed tolerance."""
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(
            actual[name], value, rtol=TOLERANCE, atol=TOLERANCE, err_msg=name
        )
