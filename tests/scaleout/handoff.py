"""The handoff scenario both handoff tests run: sessions stepped through Envoy by the SDK
while one replica drains, every output then checked against onnxruntime run directly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from rnnserve.client import AsyncClient, ClientOptions, ServerError
from rnnserve.testing import run_reference

from .wire import MODEL, inputs

# UNAVAILABLE (draining, or the replica gone before Envoy's health check drops it) is
# retried for up to ~30 s (the timeout bounds a call with all its retries); a step carries
# expected_position, so a retry is never applied twice.
OPTIONS = ClientOptions(timeout=30.0, retries=80, backoff=0.05, max_backoff=0.5)


@dataclass
class Run:
    """What the load saw: every session's outputs and the position after each step."""

    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    final_positions: dict[str, int] = field(default_factory=dict)
    final_states: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    cancelled: int = 0  # steps sent again after gRPC's CANCELLED


async def step_through(
    target: str, sessions: int, steps: int, drain: Callable[[], None], drain_after: float
) -> Run:
    """Open ``sessions`` sessions, step each ``steps`` times concurrently; call ``drain``
    once ``drain_after`` of all steps are answered. Returns what every session saw."""
    run = Run()
    total, done = sessions * steps, 0
    drained = False
    async with AsyncClient(target, options=OPTIONS) as client:
        handles = []
        for i in range(sessions):
            session_id = f"handoff-{i}"
            run.inputs[session_id] = inputs(seed=1000 + i, steps=steps)
            run.outputs[session_id], run.positions[session_id] = [], []
            handles.append(await client.open_session(MODEL, session_id=session_id))

        async def drive(session) -> None:  # noqa: ANN001
            nonlocal done, drained
            for x in run.inputs[session.session_id]:
                y = await _step(session, x, run)
                run.outputs[session.session_id].append(y)
                run.positions[session.session_id].append(session.position)
                done += 1
                if not drained and done >= drain_after * total:
                    drained = True
                    drain()
                await asyncio.sleep(0)

        await asyncio.gather(*(drive(h) for h in handles))
        for handle in handles:
            exported = await handle.export_state()
            run.final_positions[handle.session_id] = exported.position
            run.final_states[handle.session_id] = {
                k: np.asarray(v) for k, v in exported.state.items()
            }
    return run


async def _step(session, x: np.ndarray, run: Run) -> np.ndarray:  # noqa: ANN001
    """One step; a CANCELLED from gRPC while a replica closes is sent again as it was.

    That is safe because the step carries the same ``expected_position``: if the first try
    was applied, the server answers with the stored reply instead of applying it again.
    """
    for _ in range(20):
        try:
            return np.asarray(await session.step(x))
        except ServerError as exc:
            if exc.code != grpc.StatusCode.CANCELLED:
                raise
            run.cancelled += 1
    raise AssertionError(f"{session.session_id}: CANCELLED 20 times")


def check_against_reference(run: Run, repository: Path) -> None:
    """Every session saw positions 1..steps and outputs/state equal to one direct run."""
    for session_id, xs in run.inputs.items():
        assert run.positions[session_id] == list(range(1, len(xs) + 1)), session_id
        assert run.final_positions[session_id] == len(xs), session_id
        whole = run_reference(repository, MODEL, "", {"x": np.concatenate(xs)})
        got = np.concatenate(run.outputs[session_id])
        np.testing.assert_allclose(got, whole["Y"], rtol=1e-5, atol=1e-6, err_msg=session_id)
        for name, value in run.final_states[session_id].items():
            np.testing.assert_allclose(value, whole[name], rtol=1e-5, atol=1e-6)
