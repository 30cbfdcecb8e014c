"""What a model version accepts and returns, checked where the session's model is known.

Frontends turn wire tensors into arrays (dtype, shape, byte count); the engine, which alone
knows which model a session runs, checks those arrays against the model's specs here before
a step is queued, and checks what onnxruntime returned before anything is committed: every
output must have exactly the batch's extent on its batch axis and every state its declared
shape, so a graph or config that would hand one session's rows to another never commits.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import numpy as np

from ..config import DTYPES, ModelConfig
from ..errors import RnnserveError, internal, invalid
from .slabs import Bound, to_batch_first

logger = logging.getLogger(__name__)
#: How many shape and dtype signatures of passing steps one model remembers.
_REMEMBERED = 1024


class _Input:
    __slots__ = ("name", "field", "dtype", "shape", "rank", "time_axis", "fixed", "range")

    def __init__(
        self,
        name: str,
        dtype: np.dtype,
        shape: list[int],
        time_axis: int,
        bounds: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        self.range = bounds
        self.field = f'inputs["{name}"]'
        self.dtype = dtype
        self.shape = tuple(shape)
        self.rank = len(shape)
        self.time_axis = time_axis
        self.fixed = [(axis, extent) for axis, extent in enumerate(shape) if extent != -1]


class ModelChecks:
    """The checks of one model version, prepared once."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.max_timesteps = config.limits.max_timesteps
        self.reject_nan = config.limits.nan_policy == "reject"
        self._inputs = [
            _Input(t.name, DTYPES[t.dtype], t.session_shape, t.session_time_axis, t.range)
            for t in config.inputs
        ]
        self._names = {t.name for t in config.inputs}
        self._count = len(self._inputs)
        self._order = [spec.name for spec in self._inputs]
        self._single = self._order[0] if len(self._order) == 1 else None
        # Whether any input's values are checked on every step (a declared range).
        self._values = any(spec.range is not None for spec in self._inputs)
        # (name, field, batch axis) of the float inputs nonfinite_rows checks, in order.
        self._nan_checked = [
            (spec.name, spec.field, config_input.batch_axis)
            for spec, config_input in zip(self._inputs, config.inputs, strict=True)
            if self.reject_nan and spec.dtype.kind == "f"
        ]
        # Shape and dtype signatures that passed -> their T (see step).
        self._passed: dict[object, int] = {}
        self._state_names = {s.input for s in config.states}
        self._states = {s.input: s for s in config.states}
        self._batch_first: dict[str, tuple[int, ...] | None] = {
            t.name: None if t.batch_axis == 0 else tuple(to_batch_first(len(t.shape), t.batch_axis))
            for t in config.outputs
        }
        # What split checks, prepared: (name, rank, batch axis, transpose to batch first) of
        # each output; (state, axes before the batch axis, axes after, dtype) of each state.
        self._n_outputs = len(config.outputs)
        self._output_checks = [
            (t.name, len(t.shape), t.batch_axis, self._batch_first[t.name]) for t in config.outputs
        ]
        self._state_checks = [
            (
                s,
                tuple(s.shape[: s.batch_axis]),
                tuple(s.shape[s.batch_axis + 1 :]),
                DTYPES[s.dtype],
            )
            for s in config.states
        ]

    # -- requests ----------------------------------------------------------------------------
    def step(self, arrays: dict[str, np.ndarray], check_values: bool = True) -> int:
        """Check one step's inputs; its timesteps T (the same for every input with a time axis).

        ``check_values=False`` leaves the NaN policy to :meth:`nonfinite_rows`, which checks a
        whole batch at once (the batcher's way: one vectorised check instead of one per step).
        Declared value ranges are checked either way: a value out of range must never reach a
        batch.

        What the shapes and dtypes give (T, or an error) depends on nothing else, so a
        combination that passed is remembered (``_passed``, bounded) and its next step skips
        straight to the checks of values.
        """
        try:
            if len(arrays) != self._count:
                raise KeyError
            if self._single is not None:
                array = arrays[self._single]
                signature: object = (array.shape, array.dtype)
            else:  # as many names as inputs, each input's found: exactly the inputs' names
                signature = tuple(
                    [(a.shape, a.dtype) for a in map(arrays.__getitem__, self._order)]
                )
        except KeyError:
            self._unknown_or_missing(arrays)
        timesteps = self._passed.get(signature)
        if timesteps is None:  # every check, input by input
            timesteps = self._every_check(arrays, check_values)
            if len(self._passed) < _REMEMBERED:
                self._passed[signature] = timesteps
            return timesteps
        # Shapes and dtypes known good: what is left depends on the values.
        if self._values or (check_values and self.reject_nan):
            for spec in self._inputs:
                self._check_values(spec, arrays[spec.name], check_values)
        return timesteps

    def _check_values(self, spec: _Input, array: np.ndarray, check_values: bool) -> None:
        """What depends on an input's values: its declared range, and (with
        ``check_values``) NaN and infinity when the policy rejects them."""
        if spec.range is not None and array.size:
            _check_range(spec, array)
        if (
            check_values
            and self.reject_nan
            and array.dtype.kind == "f"
            and not np.isfinite(array).all()
        ):
            raise _nonfinite(spec.field)

    def _every_check(self, arrays: dict[str, np.ndarray], check_values: bool) -> int:
        """:meth:`step` for a signature not seen before: every check, input by input; T."""
        timesteps = 0
        for spec in self._inputs:
            array = arrays[spec.name]
            if array.dtype != spec.dtype:
                raise invalid(
                    f"{spec.field}: dtype {array.dtype.name}, model wants {spec.dtype.name}",
                    spec.field,
                )
            shape = array.shape
            if len(shape) != spec.rank:
                raise invalid(
                    f"{spec.field}: shape {list(shape)} has rank {len(shape)}, model wants "
                    f"rank {spec.rank} (per-session shape {list(spec.shape)}, batch axis removed)",
                    f"{spec.field}.shape",
                )
            for axis, extent in spec.fixed:
                if shape[axis] != extent:
                    raise invalid(
                        f"{spec.field}: axis {axis} is {shape[axis]}, model wants {extent} "
                        f"(shape {list(spec.shape)})",
                        f"{spec.field}.shape",
                    )
            if spec.time_axis != -1:
                t = shape[spec.time_axis]
                if not 1 <= t <= self.max_timesteps:
                    raise invalid(
                        f"{spec.field}: {t} timesteps; allowed 1..{self.max_timesteps}",
                        f"{spec.field}.shape",
                    )
                if timesteps and t != timesteps:
                    raise invalid(
                        f"{spec.field}: {t} timesteps, other inputs have {timesteps}", spec.field
                    )
                timesteps = t
            self._check_values(spec, array, check_values)
        return timesteps

    def nonfinite_rows(self, feeds: dict[str, np.ndarray]) -> dict[int, RnnserveError]:
        """Rows of a batch whose float inputs hold NaN or infinity, when the policy rejects
        them: row -> its error. Empty (the usual case) after one check per input."""
        bad: dict[int, RnnserveError] = {}
        for name, field, batch_axis in self._nan_checked:  # empty unless the policy rejects
            feed = feeds[name]
            finite = np.isfinite(feed)
            if finite.all():
                continue
            axes = tuple(a for a in range(feed.ndim) if a != batch_axis)
            for row in np.flatnonzero(~finite.all(axis=axes)):
                bad.setdefault(int(row), _nonfinite(field))
        return bad

    def _unknown_or_missing(self, arrays: dict[str, np.ndarray]) -> NoReturn:
        """INVALID_ARGUMENT for inputs whose names are not exactly the model's."""
        for name in arrays:
            if name not in self._names:
                hint = " (state is kept by the server)" if name in self._state_names else ""
                raise invalid(f'inputs["{name}"]: the model has no such input{hint}', "inputs")
        for spec in self._inputs:
            if spec.name not in arrays:
                raise invalid(
                    f"{spec.field}: missing (model inputs: {sorted(self._names)})", spec.field
                )
        raise AssertionError("called for inputs whose names were the model's")

    def state(self, arrays: dict[str, np.ndarray], field_name: str) -> dict[str, np.ndarray]:
        """Check state tensors given by pair name (the state input's name)."""
        for name, array in arrays.items():
            field = f'{field_name}["{name}"]'
            spec = self._states.get(name)
            if spec is None:
                raise invalid(f"{field}: no such state pair (pairs: {sorted(self._states)})", field)
            if array.dtype != DTYPES[spec.dtype]:
                raise invalid(f"{field}: dtype {array.dtype.name}, state wants {spec.dtype}", field)
            if list(array.shape) != spec.session_shape:
                raise invalid(
                    f"{field}: shape {list(array.shape)}, state wants {spec.session_shape}",
                    f"{field}.shape",
                )
            if self.reject_nan and array.dtype.kind == "f" and not np.isfinite(array).all():
                raise _nonfinite(field)
        return arrays

    def sequence(self, arrays: dict[str, np.ndarray]) -> int:
        """Check a whole sequence for Predict (same rules as a step)."""
        return self.step(arrays)

    # -- runs --------------------------------------------------------------------------------
    def single_feeds(
        self, arrays: dict[str, np.ndarray], state: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Feeds for one sequence (batch of one), state pairs left out starting at zeros."""
        config = self.config
        feeds = {
            spec.name: np.expand_dims(arrays[spec.name], spec.batch_axis) for spec in config.inputs
        }
        for spec in config.states:
            value = state.get(spec.input)
            if value is None:
                value = np.zeros(spec.session_shape, DTYPES[spec.dtype])
            feeds[spec.input] = np.expand_dims(value, spec.batch_axis)
        return feeds

    def split(self, values: list[Bound], n: int) -> tuple[dict[str, np.ndarray], dict[str, Bound]]:
        """A run's outputs (host arrays, batch axis moved first) and new states (as returned:
        host arrays or OrtValues on the device, in the model's layout), by name; INTERNAL
        unless every output has exactly ``n`` rows on its batch axis and every state its
        declared shape and dtype. Only shapes are read: a state on the device stays there."""
        outputs: dict[str, np.ndarray] = {}
        states: dict[str, Bound] = {}
        n_out = self._n_outputs
        for (name, rank, axis, perm), value in zip(
            self._output_checks, values[:n_out], strict=True
        ):
            assert isinstance(value, np.ndarray)
            if value.ndim != rank or value.shape[axis] != n:
                raise _bad_run(f"output {name!r} has shape {list(value.shape)}", n, axis)
            # Batch axis first, as a view; a precomputed transpose, not np.moveaxis, which
            # re-validates its axes on every call.
            outputs[name] = value if perm is None else value.transpose(perm)
        for (state, before, after, dtype), value in zip(
            self._state_checks, values[n_out:], strict=True
        ):
            want = (*before, n, *after)
            if isinstance(value, np.ndarray):  # compared as tuples and dtype objects
                ok = value.shape == want and (
                    value.dtype == dtype or value.dtype.name == state.dtype
                )
            else:
                shape, name = _shape_and_dtype(value)
                ok = shape == list(want) and name == state.dtype
            if not ok:
                shape, name = _shape_and_dtype(value)
                raise _bad_run(
                    f"state {state.output!r} has shape {shape} {name}, "
                    f"wanted {list(want)} {state.dtype}",
                    n,
                    state.batch_axis,
                )
            states[state.input] = value
        return outputs, states


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def _shape_and_dtype(value: Bound) -> tuple[list[int], str]:
    """Shape and dtype name of a host array or an OrtValue (without copying it anywhere)."""
    if isinstance(value, np.ndarray):
        return list(value.shape), value.dtype.name
    return list(value.shape()), _ORT_DTYPES.get(value.data_type(), value.data_type())


def _check_range(spec: _Input, array: np.ndarray) -> None:
    """Every value within the input's declared range (one min and one max over the array):
    checked on every step and Predict, whatever ``check_values`` says, because a value out of
    range may run without error and answer for another value (a Gather reads -1 as the
    table's last row), or fail onnxruntime's run for the whole batch."""
    low, high = spec.range  # type: ignore[misc]
    least, most = int(array.min()), int(array.max())
    if least < low or most > high:
        bad = least if least < low else most
        raise invalid(
            f"{spec.field}: value {bad} is outside the input's range {low}..{high} "
            "(range in the model's config.toml)",
            spec.field,
        )


def _nonfinite(field: str) -> RnnserveError:
    return invalid(f"{field}: NaN or infinite values (nan_policy = reject)", field)


def _bad_run(what: str, n: int, axis: int) -> RnnserveError:
    logger.error(
        "event=bad_run %s for a batch of %d on batch axis %d; nothing was committed "
        "(the model's config does not describe its graph)",
        what,
        n,
        axis,
    )
    return internal()
