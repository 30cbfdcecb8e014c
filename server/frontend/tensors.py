"""Wire tensors to numpy and back: the frontend's half of every request and reply.

Arrays are made with ``np.frombuffer`` straight over the message bytes (no copy). Decoding
checks only what the wire itself says (a known dtype, non-negative extents, a byte count that
matches the shape); whether the arrays fit the session's model is checked by the engine
(:mod:`rnnserve.server.engine.checks`), which alone knows the session's model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from rnnserve.v1 import tensor_pb2

from ..config import DTYPES
from ..errors import RnnserveError, invalid

_FROM_PROTO: dict[int, np.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: DTYPES["float32"],
    tensor_pb2.DATA_TYPE_FLOAT16: DTYPES["float16"],
    tensor_pb2.DATA_TYPE_FLOAT64: DTYPES["float64"],
    tensor_pb2.DATA_TYPE_INT32: DTYPES["int32"],
    tensor_pb2.DATA_TYPE_INT64: DTYPES["int64"],
}
_TO_PROTO: dict[np.dtype, int] = {dtype: code for code, dtype in _FROM_PROTO.items()}
PROTO_DTYPE: dict[str, int] = {name: _TO_PROTO[dtype] for name, dtype in DTYPES.items()}
#: numpy keeps at most this many dimensions; a deeper shape is refused as malformed.
MAX_RANK = 32


def to_array(tensor: tensor_pb2.Tensor, field: str) -> np.ndarray:
    """The tensor as a read-only numpy view over its bytes; INVALID_ARGUMENT if malformed."""
    dtype = _FROM_PROTO.get(tensor.dtype)
    if dtype is None:
        raise invalid(f"{field}: dtype {tensor.dtype} is not supported", f"{field}.dtype")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise invalid(f"{field}: rank {len(shape)} is over {MAX_RANK}", f"{field}.shape")
    if shape and min(shape) < 0:
        raise invalid(f"{field}: negative extent in shape {list(shape)}", f"{field}.shape")
    expected = math.prod(shape) * dtype.itemsize  # exact; np.prod costs ~2 µs a call
    if len(tensor.data) != expected:
        raise invalid(
            f"{field}: data has {len(tensor.data)} bytes, shape {list(shape)} of "
            f"{dtype.name} needs {expected}",
            f"{field}.data",
        )
    try:
        return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError:  # an empty tensor whose other extents numpy cannot index
        raise invalid(
            f"{field}: shape {list(shape)} is too large to index", f"{field}.shape"
        ) from None


def decode(tensors: Mapping[str, tensor_pb2.Tensor], field_name: str) -> dict[str, np.ndarray]:
    """Every tensor of a map field as an array, by name."""
    return {name: to_array(t, f'{field_name}["{name}"]') for name, t in tensors.items()}


def decode_step(tensors: Mapping[str, tensor_pb2.Tensor]) -> dict[str, np.ndarray] | RnnserveError:
    """A step's inputs, or the error that malformed ones get (answered in the session's turn)."""
    try:
        return decode(tensors, "inputs")
    except RnnserveError as error:
        return error


def from_array(array: np.ndarray) -> tensor_pb2.Tensor:
    """A wire tensor holding ``array`` (little-endian, row-major)."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return tensor_pb2.Tensor(
        dtype=_TO_PROTO[np.dtype(dtype)],
        shape=array.shape,
        data=np.ascontiguousarray(array, dtype=dtype).tobytes(),
    )


def encode_map(arrays: Mapping[str, np.ndarray]) -> dict[str, tensor_pb2.Tensor]:
    return {name: from_array(value) for name, value in arrays.items()}


def digest(inputs: Mapping[str, tensor_pb2.Tensor]) -> bytes:
    """A digest of a step's inputs, to recognise a retried step."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(inputs):
        tensor = inputs[name]
        h.update(name.encode())
        h.update(np.asarray([tensor.dtype, len(tensor.shape), *tensor.shape], np.int64).tobytes())
        h.update(tensor.data)
    return h.digest()
