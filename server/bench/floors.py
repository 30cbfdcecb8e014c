"""The model floor: onnxruntime alone running the served model, with no server around it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _providers() -> list[str]:
    """The providers the server itself would choose, so both floors run on the same device."""
    from rnnserve.server.runtime import choose_providers

    return choose_providers()[0]


def model_floor(
    model_path: Path,
    feeds_for: Callable[[int, int], dict[str, np.ndarray]],
    batches: tuple[int, ...],
    duration_s: float = 1.0,
    intra_op_threads: int = 1,
    timesteps: int = 1,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Time one run of ``timesteps`` at each batch size: per-batch run time and steps/s.

    ``feeds_for(batch, timesteps)`` builds the graph feeds.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # as the server runs it
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=_providers())
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        feeds = feeds_for(batch, timesteps)
        for _ in range(5):
            session.run(None, feeds)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            session.run(None, feeds)
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        out[str(batch)] = {"step_s": per_run, "steps_per_s": batch / per_run}
    return out, session.get_providers()
