"""Wire tensors to numpy and back, and the checks a request's tensors must pass.

Arrays are made with ``np.frombuffer`` straight over the message bytes (no copy); every
check runs before any session state is touched, so a bad tensor changes nothing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from rnnserve.v1 import tensor_pb2

from .config import DTYPES, StateConfig, TensorConfig
from .errors import invalid

_FROM_PROTO: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: DTYPES["float32"],
    tensor_pb2.DATA_TYPE_FLOAT16: DTYPES["float16"],
    tensor_pb2.DATA_TYPE_FLOAT64: DTYPES["float64"],
    tensor_pb2.DATA_TYPE_INT32: DTYPES["int32"],
    tensor_pb2.DATA_TYPE_INT64: DTYPES["int64"],
}
_TO_PROTO: dict[np.dtype, int] = {dtype: code for code, dtype in _FROM_PROTO.items()}
PROTO_DTYPE: dict[str, int] = {name: _TO_PROTO[dtype] for name, dtype in DTYPES.items()}


def to_array(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """The tensor as a read-only numpy view over its bytes; INVALID_ARGUMENT if malformed."""
    dtype = _FROM_PROTO.get(tensor.dtype)
    if dtype is None:
        raise invalid(f"{field}: dtype {tensor.dtype} is not supported", f"{field}.dtype")
    shape = tuple(tensor.shape)
    if any(extent < 0 for extent in shape):
        raise invalid(f"{field}: negative extent in shape {list(shape)}", f"{field}.shape")
    expected = math.prod(shape) * dtype.itemsize  # exact; np.prod costs ~2 µs a call
    if len(tensor.data) != expected:
        raise invalid(
            f"{field}: data has {len(tensor.data)} bytes, shape {list(shape)} of "
            f"{dtype.name} needs {expected}",
            f"{field}.data",
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def from_array(array: np.ndarray) -> tensor_pb2.Tensor:
    """A wire tensor holding ``array`` (little-endian, row-major)."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return tensor_pb2.Tensor(
        dtype=_TO_PROTO[np.dtype(dtype)],
        shape=array.shape,
        data=np.ascontiguousarray(array, dtype=dtype).tobytes(),
    )


def _check_nan(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise invalid(f"{field}: NaN or infinite values (nan_policy = reject)", field)


def check_input(
    spec: TensorConfig, array: np.ndarray, field: str, max_timesteps: int, reject_nan: bool
) -> int:
    """Check one per-session input; return its timesteps (0 if it has no time axis)."""
    if array.dtype != DTYPES[spec.dtype]:
        raise invalid(f"{field}: dtype {array.dtype.name}, model wants {spec.dtype}", field)
    want = spec.session_shape
    if array.ndim != len(want):
        raise invalid(
            f"{field}: shape {list(array.shape)} has rank {array.ndim}, model wants rank "
            f"{len(want)} (per-session shape {want}, batch axis removed)",
            f"{field}.shape",
        )
    for axis, (got, extent) in enumerate(zip(array.shape, want, strict=True)):
        if extent != -1 and got != extent:
            raise invalid(
                f"{field}: axis {axis} is {got}, model wants {extent} (shape {want})",
                f"{field}.shape",
            )
    timesteps = 0
    if spec.session_time_axis != -1:
        timesteps = array.shape[spec.session_time_axis]
        if not 1 <= timesteps <= max_timesteps:
            raise invalid(
                f"{field}: {timesteps} timesteps; allowed 1..{max_timesteps}", f"{field}.shape"
            )
    if reject_nan:
        _check_nan(array, field)
    return timesteps


def check_state(spec: StateConfig, array: np.ndarray, field: str, reject_nan: bool) -> None:
    """Check one per-session state tensor against its pair's spec."""
    if array.dtype != DTYPES[spec.dtype]:
        raise invalid(f"{field}: dtype {array.dtype.name}, state wants {spec.dtype}", field)
    if list(array.shape) != spec.session_shape:
        raise invalid(
            f"{field}: shape {list(array.shape)}, state wants {spec.session_shape}",
            f"{field}.shape",
        )
    if reject_nan:
        _check_nan(array, field)


def parse_inputs(
    inputs: Mapping[str, tensor_pb2.Tensor],
    specs: list[TensorConfig],
    state_names: set[str],
    max_timesteps: int,
    reject_nan: bool,
) -> tuple[dict[str, np.ndarray], int]:
    """Every model input, checked; and the step's timesteps T (the same for all inputs)."""
    known = {spec.name for spec in specs}
    for name in inputs:
        if name not in known:
            hint = " (state is kept by the server)" if name in state_names else ""
            raise invalid(f'inputs["{name}"]: the model has no such input{hint}', "inputs")
    arrays: dict[str, np.ndarray] = {}
    timesteps = 0
    for spec in specs:
        field = f'inputs["{spec.name}"]'
        if spec.name not in inputs:
            raise invalid(f"{field}: missing (model inputs: {sorted(known)})", field)
        array = to_array(inputs[spec.name], field)
        t = check_input(spec, array, field, max_timesteps, reject_nan)
        if t and timesteps and t != timesteps:
            raise invalid(f"{field}: {t} timesteps, other inputs have {timesteps}", field)
        timesteps = timesteps or t
        arrays[spec.name] = array
    return arrays, timesteps


def parse_state(
    tensors: Mapping[str, tensor_pb2.Tensor],
    specs: list[StateConfig],
    field_name: str,
    reject_nan: bool,
) -> dict[str, np.ndarray]:
    """State tensors by pair name (the state input's name), checked."""
    by_name = {spec.input: spec for spec in specs}
    result: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        field = f'{field_name}["{name}"]'
        spec = by_name.get(name)
        if spec is None:
            raise invalid(f"{field}: no such state pair (pairs: {sorted(by_name)})", field)
        array = to_array(tensor, field)
        check_state(spec, array, field, reject_nan)
        result[name] = array
    return result


def digest(inputs: Mapping[str, tensor_pb2.Tensor]) -> bytes:
    """A digest of a step's inputs, to recognise a retried step."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        tensor = inputs[name]
        h.update(name.encode())
        h.update(np.asarray([tensor.dtype, len(tensor.shape), *tensor.shape], np.int64).tobytes())
        h.update(tensor.data)
    return h.digest()
