"""numpy arrays to and from ``rnnserve.v1.Tensor``.

The wire format is ``{dtype, shape, raw little-endian bytes in C order}``. Decoding is
zero-copy: the returned array is a read-only view over the message's bytes (copy it before
writing into it). Encoding makes exactly one copy, into the ``bytes`` the message needs, and
accepts anything ``numpy.asarray`` does, including non-contiguous views and big-endian arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from rnnserve.v1 import tensor_pb2

from ._exceptions import InvalidInput

# Every element type the API knows, little-endian as on the wire.
_TO_NUMPY: dict[int, np.dtype[Any]] = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY: dict[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _TO_NUMPY.items()
}

SUPPORTED_DTYPES: tuple[np.dtype[Any], ...] = tuple(
    np.dtype(d.newbyteorder("=")) for d in _TO_NUMPY.values()
)


def numpy_dtype(data_type: int) -> np.dtype[Any]:
    """The numpy dtype of an API ``DataType`` value; InvalidInput for an unknown one."""
    try:
        return _TO_NUMPY[data_type]
    except KeyError:
        raise InvalidInput(f"unsupported tensor data type {data_type}") from None


def data_type(dtype: npt.DTypeLike) -> int:
    """The API ``DataType`` value of a numpy dtype; InvalidInput for one the API lacks."""
    resolved = np.dtype(dtype)
    try:
        return _FROM_NUMPY[(resolved.kind, resolved.itemsize)]
    except KeyError:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise InvalidInput(f"dtype {resolved} is not supported (use one of {names})") from None


def to_tensor(value: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> tensor_pb2.Tensor:
    """Encode an array (or anything array-like) as a Tensor, cast to ``dtype`` if given.

    InvalidInput for values that are not an array of numbers (text, ragged lists) and for a
    cast that would change them (a fraction or NaN for an integer input, a number outside the
    integer type): an input silently rounded is a wrong answer, not an error the caller sees.
    """
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"cannot make an array of numbers of the value given: {exc}") from None
    if dtype is not None:
        array = _cast(array, np.dtype(dtype))
    code = data_type(array.dtype)
    wire = array.astype(_TO_NUMPY[code], copy=False)  # a no-op unless byte order differs
    return tensor_pb2.Tensor(dtype=code, shape=wire.shape, data=wire.tobytes(order="C"))


def _cast(array: npt.NDArray[Any], target: np.dtype[Any]) -> npt.NDArray[Any]:
    """``array`` as ``target``, or InvalidInput if any value would change on the way."""
    if array.dtype == target:
        return array
    given = array.dtype
    if given.kind in "fc" and target.kind in "iu":
        whole = given.kind == "f" and bool(np.all(np.isfinite(array) & (array == np.trunc(array))))
        if not whole:
            raise InvalidInput(
                f"values of dtype {given} with fractions (or NaN, inf) for an input of dtype "
                f"{target}: round them first"
            )
    elif not np.can_cast(given, target, casting="same_kind"):
        raise InvalidInput(f"values of dtype {given} do not fit an input of dtype {target}")
    if target.kind in "iu" and array.size:
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"values {low}..{high} do not fit an input of dtype {target} "
                f"({info.min}..{info.max})"
            )
    return array.astype(target)


def from_tensor(tensor: tensor_pb2.Tensor) -> npt.NDArray[Any]:
    """Decode a Tensor as a read-only numpy view over its bytes (no copy)."""
    dtype = numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(tensor.data) != count * dtype.itemsize:
        raise InvalidInput(
            f"tensor of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
            f"got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype, count=count).reshape(shape)


def to_tensor_map(
    values: Mapping[str, npt.ArrayLike],
) -> dict[str, tensor_pb2.Tensor]:
    """Encode a name -> array mapping."""
    return {name: to_tensor(value) for name, value in values.items()}


def from_tensor_map(tensors: Mapping[str, tensor_pb2.Tensor]) -> dict[str, npt.NDArray[Any]]:
    """Decode a name -> Tensor mapping (zero-copy views)."""
    return {name: from_tensor(tensor) for name, tensor in tensors.items()}
