"""Reading and checking one model's ``config.toml`` (format: docs/model-repository.md).

pydantic checks types and names the field of every mistake; :func:`load_model_config`
prefixes the file so a bad repository fails at start with ``<file>: <field>: <problem>``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from .errors import ConfigError

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
DTypeName = Literal["float32", "float16", "float64", "int32", "int64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _dynamic(shape: list[int], axis: int, field: str) -> None:
    """The batch and time axes vary from run to run, so their extent is written -1."""
    if shape[axis] != -1:
        raise ValueError(
            f"{field} = {axis} but shape[{axis}] = {shape[axis]}: a {field.split('_')[0]} axis "
            f"varies from run to run, write -1 there (or is the {field} wrong?)"
        )


def _check_range(bounds: tuple[int, int], dtype: str) -> None:
    """A range is for integer values, low <= high, both representable in the dtype."""
    low, high = bounds
    if DTYPES[dtype].kind != "i":
        raise ValueError(
            f"range = [{low}, {high}] on a {dtype} input: only integer inputs (int32, int64) "
            "take a range"
        )
    if low > high:
        raise ValueError(f"range = [{low}, {high}]: the first bound is the lowest allowed value")
    info = np.iinfo(DTYPES[dtype])
    if low < info.min or high > info.max:
        raise ValueError(
            f"range = [{low}, {high}]: outside what {dtype} holds ({info.min}..{info.max})"
        )


class TensorConfig(_Strict):
    """A non-state graph input or a returned graph output."""

    name: str = Field(min_length=1)
    dtype: DTypeName
    shape: list[int] = Field(min_length=1)
    batch_axis: int
    time_axis: int = -1

    @model_validator(mode="after")
    def _axes(self) -> TensorConfig:
        rank = len(self.shape)
        if not 0 <= self.batch_axis < rank:
            raise ValueError(f"batch_axis {self.batch_axis} is outside shape of rank {rank}")
        if self.time_axis != -1 and not 0 <= self.time_axis < rank:
            raise ValueError(f"time_axis {self.time_axis} is outside shape of rank {rank}")
        if self.time_axis == self.batch_axis:
            raise ValueError("time_axis and batch_axis must differ")
        for axis, extent in enumerate(self.shape):
            if extent < -1 or extent == 0:
                raise ValueError(f"shape[{axis}] = {extent}: extents are positive or -1")
        _dynamic(self.shape, self.batch_axis, "batch_axis")
        if self.time_axis != -1:
            _dynamic(self.shape, self.time_axis, "time_axis")
        return self

    @property
    def session_shape(self) -> list[int]:
        """The per-session shape: batch axis removed (-1 stays for time)."""
        return [e for axis, e in enumerate(self.shape) if axis != self.batch_axis]

    @property
    def session_time_axis(self) -> int:
        """Index of the time axis in :attr:`session_shape`, or -1."""
        if self.time_axis == -1:
            return -1
        return self.time_axis - (1 if self.time_axis > self.batch_axis else 0)


class InputConfig(TensorConfig):
    """A non-state graph input: a tensor, and for integers optionally the values allowed."""

    #: Inclusive bounds of an integer input's values, e.g. the rows of an embedding table a
    #: token id indexes: a value outside is refused before it is queued, since a graph op may
    #: read it without failing (a Gather takes -1 as the last row) and answer for the wrong
    #: token. Only inputs of an integer dtype take one.
    range: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _range(self) -> InputConfig:
        if self.range is not None:
            _check_range(self.range, self.dtype)
        return self


class StateConfig(_Strict):
    """A state pair: graph input taking the previous state, output returning the next."""

    input: str = Field(min_length=1)
    output: str = Field(min_length=1)
    dtype: DTypeName
    shape: list[int] = Field(min_length=1)
    batch_axis: int

    @model_validator(mode="after")
    def _axes(self) -> StateConfig:
        rank = len(self.shape)
        if not 0 <= self.batch_axis < rank:
            raise ValueError(f"batch_axis {self.batch_axis} is outside shape of rank {rank}")
        for axis, extent in enumerate(self.shape):
            if axis != self.batch_axis and extent < 1:
                raise ValueError(f"shape[{axis}] = {extent}: state extents must be static")
        _dynamic(self.shape, self.batch_axis, "batch_axis")
        return self

    @property
    def session_shape(self) -> list[int]:
        return [e for axis, e in enumerate(self.shape) if axis != self.batch_axis]


class Limits(_Strict):
    """Serving limits; every field optional with the documented default."""

    max_batch_size: int = Field(default=256, ge=1)
    max_queue_delay_us: int = Field(default=500, ge=0)
    #: The longest a step waits for its cohort while the engine is saturated (its loop busy
    #: nearly all of the last 100 ms): waiting then costs no throughput, the loop has other
    #: work, and bigger batches need less of it per step. Default: 4 x max_queue_delay_us.
    busy_queue_delay_us: int | None = Field(default=None, ge=0)
    max_sessions: int = Field(default=10000, ge=1)
    idle_timeout_s: float = Field(default=600.0, gt=0)
    max_timesteps: int = Field(default=4096, ge=1)
    max_queue_size: int = Field(default=4096, ge=1)
    on_full: Literal["reject", "evict_lru"] = "reject"
    nan_policy: Literal["reject", "allow"] = "reject"

    @model_validator(mode="after")
    def _busy_delay(self) -> Limits:
        if self.busy_queue_delay_us is not None and (
            self.busy_queue_delay_us < self.max_queue_delay_us
        ):
            raise ValueError(
                f"busy_queue_delay_us = {self.busy_queue_delay_us} is below max_queue_delay_us "
                f"= {self.max_queue_delay_us}: a saturated engine waits at least as long"
            )
        return self

    @property
    def busy_delay_us(self) -> int:
        """busy_queue_delay_us, or its default."""
        if self.busy_queue_delay_us is None:
            return 4 * self.max_queue_delay_us
        return self.busy_queue_delay_us


class ModelConfig(_Strict):
    """One model's config.toml."""

    cell_kind: str = Field(min_length=1)
    description: str = ""
    inputs: list[InputConfig] = Field(min_length=1)
    outputs: list[TensorConfig] = Field(min_length=1)
    states: list[StateConfig] = Field(min_length=1)
    limits: Limits = Limits()
    metadata: dict[str, str] = {}

    @model_validator(mode="after")
    def _names(self) -> ModelConfig:
        state_inputs = {s.input: n for n, s in enumerate(self.states)}
        state_outputs = {s.output: n for n, s in enumerate(self.states)}
        for n, t in enumerate(self.inputs):
            if t.name in state_inputs:
                raise ValueError(
                    f"inputs[{n}] {t.name!r} is also states[{state_inputs[t.name]}].input: the "
                    "server feeds a state input from the session's state, so a client cannot "
                    "send it too; remove it from [[inputs]] (set a session's state with "
                    "OpenSession's initial_state)"
                )
        for n, out in enumerate(self.outputs):
            if out.name in state_outputs:
                raise ValueError(
                    f"outputs[{n}] {out.name!r} is also states[{state_outputs[out.name]}].output: "
                    "a state output is the session's next state, which the server keeps and "
                    "feeds back on the next step; remove it from [[outputs]] (read a "
                    "session's state with ExportState)"
                )
        graph_inputs = [t.name for t in self.inputs] + [s.input for s in self.states]
        graph_outputs = [t.name for t in self.outputs] + [s.output for s in self.states]
        for kind, names in (("input", graph_inputs), ("output", graph_outputs)):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"graph {kind} {name!r} is declared twice")
                seen.add(name)
        if not any(t.time_axis != -1 for t in self.inputs):
            raise ValueError("at least one input needs a time_axis")
        return self


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def load_model_config(path: Path) -> ModelConfig:
    """Parse and check ``path``; raise :class:`ConfigError` naming the file and field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing config.toml") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field {_field_path(err['loc'])}: {_message(err)}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def _message(err: ErrorDetails) -> str:
    """pydantic's message, with a hint for the mistakes people make most."""
    loc = err["loc"]
    if err["type"] == "extra_forbidden":
        if loc and loc[0] == "states" and loc[-1] == "time_axis":
            return (
                "a state has no time axis: it is the value after the last timestep, one per "
                "session (only [[inputs]] and [[outputs]] take time_axis)"
            )
        if loc and loc[0] == "outputs" and loc[-1] == "range":
            return (
                "only [[inputs]] take a range (the server checks what clients send, not what "
                "the model returns)"
            )
        return "unknown key (a typo? see docs/model-repository.md for the fields)"
    message = err["msg"]
    return message.removeprefix("Value error, ")
