"""Turning a caller's arrays into a step's named input tensors, and outputs back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt
from rnnserve.v1 import tensor_pb2

from ._exceptions import InvalidInput
from ._models import ModelInfo
from ._tensors import from_tensor, to_tensor

Output = npt.NDArray[Any] | dict[str, npt.NDArray[Any]]


def encode_inputs(
    model: ModelInfo, x: npt.ArrayLike | None, named: Mapping[str, npt.ArrayLike]
) -> dict[str, tensor_pb2.Tensor]:
    """Named input tensors of ``model``, each cast to its declared dtype.

    ``x`` is shorthand for the model's only data input; a model with several inputs takes them
    by name. Unknown names are refused here rather than by a round-trip to the server.
    """
    specs = {spec.name: spec for spec in model.data_inputs}
    values: dict[str, npt.ArrayLike] = dict(named)
    if x is not None:
        if len(specs) != 1:
            raise InvalidInput(f"model {model.name} has inputs {sorted(specs)}; pass them by name")
        (only,) = specs
        if only in values:
            raise InvalidInput(f"input {only!r} given both positionally and by name")
        values[only] = x
    unknown = sorted(set(values) - set(specs))
    if unknown:
        raise InvalidInput(f"model {model.name} has no input(s) {unknown}; it has {sorted(specs)}")
    return {name: to_tensor(value, specs[name].dtype) for name, value in values.items()}


def encode_state(
    model: ModelInfo, state: Mapping[str, npt.ArrayLike] | None
) -> dict[str, tensor_pb2.Tensor]:
    """State tensors by pair name, each cast to the pair's dtype."""
    if not state:
        return {}
    specs = {spec.name: spec for spec in model.states}
    unknown = sorted(set(state) - set(specs))
    if unknown:
        raise InvalidInput(f"model {model.name} has no state pair(s) {unknown}")
    return {name: to_tensor(value, specs[name].dtype) for name, value in state.items()}


def decode_outputs(tensors: Mapping[str, tensor_pb2.Tensor]) -> Output:
    """The only output as an array, or all of them by name when there are several."""
    if len(tensors) == 1:
        (tensor,) = tensors.values()
        return from_tensor(tensor)
    return {name: from_tensor(tensor) for name, tensor in tensors.items()}
