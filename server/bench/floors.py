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


def _dims(shape, batch: int, timesteps: int) -> list[int]:
    """Concrete dims for an ONNX input: the first symbolic dim is time, the other batch."""
    dims, seen_time = [], False
    for dim in shape:
        if isinstance(dim, int):
            dims.append(dim)
        elif not seen_time and len(shape) == 3 and dim in ("T", "time", "seq", "sequence"):
            dims.append(timesteps)
            seen_time = True
        else:
            dims.append(batch)
    return dims


def model_floor(
    model_path: Path,
    batches: tuple[int, ...],
    feeds_for: Callable[[int], dict[str, np.ndarray]] | None = None,
    duration_s: float = 1.0,
    intra_op_threads: int = 1,
    timesteps: int = 1,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Time one run of ``timesteps`` at each batch size: per-batch run time and steps/s.

    ``feeds_for(batch)`` builds the graph feeds; by default every input is filled with
    random float32 of its shape with symbolic dims taken as batch (time = 1).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # as the server runs it
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=_providers())
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        if feeds_for is not None:
            feeds = feeds_for(batch)
        else:
            feeds = {
                i.name: rng.standard_normal(_dims(i.shape, batch, timesteps)).astype(np.float32)
                for i in session.get_inputs()
            }
        for _ in range(5):
            session.run(None, feeds)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < duration_s:
            session.run(None, feeds)
            runs += 1
        per_run = (time.perf_counter() - start) / runs
        out[str(batch)] = {"step_s": per_run, "steps_per_s": batch / per_run}
    return out, session.get_providers()
