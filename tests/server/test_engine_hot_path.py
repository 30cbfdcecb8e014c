"""The engine's fast paths answer exactly as the plain code they short-cut.

ModelChecks.step remembers shape and dtype signatures that passed (value checks still run on
every step); a batch's inputs are stacked by one concatenate where the shapes allow it; the
split of a run's outputs compares tuples and dtype objects. Each is checked here against what
the plain checks (or np.stack) give.
"""

from __future__ import annotations

import numpy as np
import pytest
from rnnserve.server.config import InputConfig, ModelConfig, StateConfig, TensorConfig
from rnnserve.server.engine.checks import ModelChecks
from rnnserve.server.errors import RnnserveError


def _config(nan_policy: str = "reject") -> ModelConfig:
    return ModelConfig(
        cell_kind="test",
        inputs=[
            InputConfig(
                name="tokens",
                dtype="int64",
                shape=[-1, -1],
                batch_axis=1,
                time_axis=0,
                range=(0, 9),
            ),
            InputConfig(name="x", dtype="float32", shape=[-1, -1, 3], batch_axis=1, time_axis=0),
        ],
        outputs=[TensorConfig(name="y", dtype="float32", shape=[-1, -1, 4], batch_axis=1)],
        states=[
            StateConfig(input="h", output="hn", dtype="float32", shape=[1, -1, 4], batch_axis=1)
        ],
        limits={"nan_policy": nan_policy, "max_timesteps": 8},
    )


def _step(t: int = 2, token: int = 1, x: float = 0.5) -> dict[str, np.ndarray]:
    return {
        "tokens": np.full((t,), token, np.int64),
        "x": np.full((t, 3), x, np.float32),
    }


def _error(checks: ModelChecks, arrays: dict[str, np.ndarray], **kwargs: bool) -> str | None:
    try:
        checks.step(arrays, **kwargs)
    except RnnserveError as error:
        return f"{error.reason}: {error}"
    return None


@pytest.mark.parametrize("check_values", [True, False])
def test_a_remembered_signature_still_checks_values(check_values: bool) -> None:
    remembered, fresh = ModelChecks(_config()), ModelChecks(_config())
    assert remembered.step(_step(), check_values=check_values) == 2
    assert remembered.step(_step(), check_values=check_values) == 2  # from the memory
    for bad in (_step(token=10), _step(token=-1), _step(x=float("nan")), _step(x=float("inf"))):
        fresh._passed.clear()  # noqa: SLF001
        got = _error(remembered, bad, check_values=check_values)
        want = _error(fresh, bad, check_values=check_values)
        assert got == want
    # The range is checked whatever check_values says; NaN only with it.
    assert _error(remembered, _step(token=10), check_values=check_values) is not None
    assert (_error(remembered, _step(x=float("nan")), check_values=check_values) is None) is (
        not check_values
    )


def test_bad_shapes_and_dtypes_fail_alike_before_and_after_a_good_step() -> None:
    bad_steps = [
        {"tokens": np.zeros((2,), np.int32), "x": np.zeros((2, 3), np.float32)},
        {"tokens": np.zeros((2,), np.int64), "x": np.zeros((2, 4), np.float32)},
        {"tokens": np.zeros((2,), np.int64), "x": np.zeros((3, 3), np.float32)},
        {"tokens": np.zeros((9,), np.int64), "x": np.zeros((9, 3), np.float32)},
        {"tokens": np.zeros((2, 1), np.int64), "x": np.zeros((2, 3), np.float32)},
        # Two faults: the first input's range and the second's dtype; the same one is named.
        {"tokens": np.full((2,), 99, np.int64), "x": np.zeros((2, 3), np.float64)},
        {"tokens": np.zeros((2,), np.int64)},
        {**_step(), "h": np.zeros((1, 4), np.float32)},
    ]
    for bad in bad_steps:
        checks = ModelChecks(_config())
        before = _error(checks, bad)
        checks.step(_step())
        checks.step(_step(t=3))
        after = _error(checks, bad)
        assert before is not None
        assert before == after, bad
        assert _error(checks, bad) == before  # a failing signature is never remembered


def test_a_remembered_signature_gives_its_own_timesteps() -> None:
    checks = ModelChecks(_config())
    for t in (1, 2, 3, 1, 2, 3):
        assert checks.step(_step(t=t)) == t


def test_split_accepts_what_it_accepted_and_refuses_what_it_refused() -> None:
    checks = ModelChecks(_config())
    n = 3
    y = np.zeros((1, n, 4), np.float32)
    outputs, states = checks.split([y, np.zeros((1, n, 4), np.float32)], n)
    assert outputs["y"].shape == (n, 1, 4) and states["h"].shape == (1, n, 4)
    for bad_state in (
        np.zeros((1, n + 1, 4), np.float32),
        np.zeros((1, n, 4), np.float64),
        np.zeros((n, 4), np.float32),
    ):
        with pytest.raises(RnnserveError):
            checks.split([y, bad_state], n)
    with pytest.raises(RnnserveError):
        checks.split([np.zeros((1, n + 1, 4), np.float32), np.zeros((1, n, 4), np.float32)], n)


@pytest.mark.parametrize(
    ("shape", "axis"), [((1, 32), 1), ((3, 32), 1), ((3, 32), 0), ((2, 4, 5), 2), ((2,), 0)]
)
def test_one_concatenate_stacks_a_batch_as_np_stack_does(shape: tuple, axis: int) -> None:
    rng = np.random.default_rng(len(shape) + axis)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(5)]
    stacked = np.concatenate(arrays, axis).reshape((*shape[:axis], 5, *shape[axis:]))
    assert stacked.flags.c_contiguous
    assert np.array_equal(stacked, np.stack(arrays, axis))
