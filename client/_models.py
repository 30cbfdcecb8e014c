"""Plain descriptions of models, sessions and exported state (no protobuf in the public API)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import numpy.typing as npt
from rnnserve.v1 import inference_service_pb2 as pb

from ._tensors import from_tensor_map, numpy_dtype


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A per-session tensor: batch axis removed, ``-1`` for a dynamic extent."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    time_axis: int


@dataclasses.dataclass(frozen=True)
class StateInfo:
    """A recurrent state pair, named by its graph input."""

    name: str
    input: str
    output: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One loaded model version, as the server describes it."""

    name: str
    version: str
    versions: tuple[str, ...]
    cell_kind: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    states: tuple[StateInfo, ...]
    max_batch_size: int
    max_sessions: int
    idle_timeout_ms: int
    max_timesteps: int
    metadata: dict[str, str]
    providers: tuple[str, ...]

    @property
    def data_inputs(self) -> tuple[TensorInfo, ...]:
        """The inputs a step must carry: every input that is not a state pair's input."""
        state_inputs = {state.input for state in self.states} | {s.name for s in self.states}
        return tuple(spec for spec in self.inputs if spec.name not in state_inputs)

    @classmethod
    def from_proto(cls, model: pb.Model) -> ModelInfo:
        """Build from the API message."""
        return cls(
            name=model.name,
            version=model.version,
            versions=tuple(model.versions),
            cell_kind=model.cell_kind,
            inputs=tuple(_tensor_info(spec) for spec in model.inputs),
            outputs=tuple(_tensor_info(spec) for spec in model.outputs),
            states=tuple(
                StateInfo(s.name, s.input, s.output, numpy_dtype(s.dtype), tuple(s.shape))
                for s in model.states
            ),
            max_batch_size=model.limits.max_batch_size,
            max_sessions=model.limits.max_sessions,
            idle_timeout_ms=model.limits.idle_timeout_ms,
            max_timesteps=model.limits.max_timesteps,
            metadata=dict(model.metadata),
            providers=tuple(model.providers),
        )


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """A session as the server last reported it (times in seconds since the epoch)."""

    session_id: str
    model: str
    version: str
    position: int
    create_time: float
    last_use_time: float

    @classmethod
    def from_proto(cls, session: pb.Session) -> SessionInfo:
        """Build from the API message."""
        return cls(
            session_id=session.session_id,
            model=session.model,
            version=session.version,
            position=session.position,
            create_time=session.create_time.ToNanoseconds() / 1e9,
            last_use_time=session.last_use_time.ToNanoseconds() / 1e9,
        )


@dataclasses.dataclass(frozen=True)
class ExportedState:
    """A session's state tensors and the position they belong to; open a session from it."""

    model: str
    version: str
    position: int
    state: dict[str, npt.NDArray[Any]]

    @classmethod
    def from_proto(cls, response: pb.ExportStateResponse) -> ExportedState:
        """Build from the API message (state arrays are read-only views)."""
        return cls(
            model=response.session.model,
            version=response.session.version,
            position=response.session.position,
            state=from_tensor_map(response.state),
        )


@dataclasses.dataclass(frozen=True)
class Prediction:
    """Result of a stateless whole-sequence run."""

    outputs: dict[str, npt.NDArray[Any]]
    final_state: dict[str, npt.NDArray[Any]]


def _tensor_info(spec: pb.TensorSpec) -> TensorInfo:
    return TensorInfo(spec.name, numpy_dtype(spec.dtype), tuple(spec.shape), spec.time_axis)
