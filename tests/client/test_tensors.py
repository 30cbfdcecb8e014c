"""The numpy <-> Tensor codec: every dtype, every layout, zero-copy decoding."""

from __future__ import annotations

import numpy as np
import pytest
from rnnserve.client import InvalidInput
from rnnserve.client._tensors import SUPPORTED_DTYPES, data_type, from_tensor, to_tensor
from rnnserve.v1 import tensor_pb2

DTYPES = ["float32", "float16", "float64", "int32", "int64"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (3, 4), (2, 3, 5), (0, 4)])
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 100).astype(dtype)
    tensor = to_tensor(array)
    assert list(tensor.shape) == list(shape)
    assert len(tensor.data) == array.size * array.itemsize
    decoded = from_tensor(tensor)
    assert decoded.dtype == np.dtype(dtype)
    assert decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_wire_bytes_are_little_endian_row_major() -> None:
    array = np.arange(6, dtype=">i4").reshape(2, 3)  # big-endian input
    tensor = to_tensor(array)
    assert tensor.dtype == tensor_pb2.DATA_TYPE_INT32
    assert tensor.data == np.arange(6, dtype="<i4").tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_views_encode_their_values(dtype: str) -> None:
    base = np.arange(48).astype(dtype).reshape(6, 8)
    for view in (base.T, base[::2, 1::3], base[:, ::-1], np.asfortranarray(base)):
        assert not view.flags.c_contiguous or view is not base
        np.testing.assert_array_equal(from_tensor(to_tensor(view)), view)


def test_decoding_is_a_read_only_view_over_the_message_bytes() -> None:
    tensor = to_tensor(np.ones((2, 3), np.float32))
    decoded = from_tensor(tensor)
    assert not decoded.flags.writeable
    assert not decoded.flags.owndata  # a view, not a copy
    with pytest.raises(ValueError):
        decoded[0, 0] = 2.0


def test_lists_and_casts_are_accepted() -> None:
    tensor = to_tensor([[0.1, 0.2], [0.3, 0.4]], np.float32)
    assert tensor.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    np.testing.assert_allclose(from_tensor(tensor), [[0.1, 0.2], [0.3, 0.4]], rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int16", "complex64", "U3", "object"])
def test_unsupported_dtypes_raise_invalid_input(dtype: str) -> None:
    with pytest.raises(InvalidInput):
        data_type(dtype)


def test_every_api_data_type_has_a_numpy_dtype() -> None:
    api_values = {
        value for name, value in tensor_pb2.DataType.items() if name != "DATA_TYPE_UNSPECIFIED"
    }
    assert {data_type(d) for d in SUPPORTED_DTYPES} == api_values


@pytest.mark.parametrize(
    "tensor",
    [
        tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 2], data=b"\0" * 15),
        tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4),
    ],
)
def test_malformed_tensors_raise_invalid_input(tensor: tensor_pb2.Tensor) -> None:
    with pytest.raises(InvalidInput):
        from_tensor(tensor)


@pytest.mark.parametrize(
    ("value", "dtype", "words"),
    [
        ([["a", "b"]], "float32", "do not fit an input of dtype float32"),
        ([[1.0, 2.0], [3.0]], "float32", "cannot make an array of numbers"),
        ({"x": 1}, "float32", "do not fit an input of dtype float32"),
        ([3.7, 10.9], "int64", "with fractions"),
        ([1.0, float("nan")], "int32", "with fractions"),
        ([1 + 2j], "float32", "do not fit"),
        ([2**40], "int32", "do not fit an input of dtype int32"),
    ],
    ids=["text", "ragged", "dict", "fractions-for-tokens", "nan-for-int", "complex", "overflow"],
)
def test_values_that_are_not_numbers_or_change_on_the_cast_raise_invalid_input(
    value: object, dtype: str, words: str
) -> None:
    # They used to raise a raw ValueError/TypeError, or be cut silently (3.7 sent as 3).
    with pytest.raises(InvalidInput, match=words):
        to_tensor(value, dtype)  # type: ignore[arg-type]


def test_whole_numbers_are_accepted_for_integer_inputs() -> None:
    assert from_tensor(to_tensor([3.0, 10.0], "int64")).tolist() == [3, 10]
    assert from_tensor(to_tensor([1, 2], "float32")).dtype == np.float32
