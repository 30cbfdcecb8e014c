"""Step replies written straight to protobuf wire bytes.

A step's reply is the same few fields every time (ids, a position, one tensor per output of a
fixed shape and dtype), and building it as protobuf objects costs more than the rest of the
frontend's work on a step: a ``Tensor`` per output, a ``StepResponse`` that copies them into
its map, a ``StepResult`` that copies that, and then gRPC serialising it all again. Here the
bytes are written directly: the constant part of each output's field is encoded once per
batch and reused, and a step costs one ``tobytes()`` per output and a few joins. A stream
sends a whole wake-up's results as one ``StreamStepsResponse`` by concatenating their
encoded ``results`` fields (a repeated field is its elements' fields one after another).

The bytes are plain proto3 encoding (``tests/server/test_wire.py`` parses them back with
protobuf and compares them with the messages built the slow way); the registered response
serializer passes ``bytes`` through unchanged (:func:`serialize`).
"""

from __future__ import annotations

import math

import numpy as np
from google.protobuf.message import Message

from ..engine.batcher import Outcome
from .status import step_error
from .tensors import _TO_PROTO

_VARINT_1 = [bytes([n]) for n in range(128)]


def _varint(value: int) -> bytes:
    """A non-negative integer as a protobuf base-128 varint."""
    if value < 128:
        return _VARINT_1[value]
    if value < 16384:  # two bytes: a reply's lengths (a row of a few hundred floats)
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int64(value: int) -> bytes:
    """An int64 field's varint (two's complement, ten bytes, for a negative value)."""
    return _varint(value if value >= 0 else value + (1 << 64))


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _string(tag: bytes, text: str) -> bytes:
    """A string field, left out when empty (proto3's default)."""
    return _length_delimited(tag, text.encode()) if text else b""


# Tags: (field number << 3) | wire type (0 varint, 2 length-delimited).
_RESULTS = b"\x0a"  # StreamStepsResponse.results = 1
_REQUEST_ID = b"\x0a"  # StepResult.request_id = 1
_SESSION_ID_2 = b"\x12"  # StepResult.session_id = 2
_RESPONSE = b"\x1a"  # StepResult.response = 3
_ERROR = b"\x22"  # StepResult.error = 4
_SESSION_ID_1 = b"\x0a"  # StepResponse.session_id = 1
_POSITION = b"\x10"  # StepResponse.position = 2
_OUTPUTS = b"\x1a"  # StepResponse.outputs = 3 (map entries)
_KEY = b"\x0a"  # map entry key = 1
_VALUE = b"\x12"  # map entry value = 2
_DTYPE = b"\x08"  # Tensor.dtype = 1
_SHAPE = b"\x12"  # Tensor.shape = 2 (packed)
_DATA = b"\x1a"  # Tensor.data = 3


class _Plans:
    """Each output's constant part, per batch: everything of its ``outputs`` map entry but the
    row's bytes (tag, lengths, key, dtype, shape: every row of a batch output has the same).
    All of a batch's outcomes share one ``outputs`` dict, so the last one's plan is kept and
    a step costs one ``tobytes()`` per output."""

    __slots__ = ("_outputs", "_plan")

    def __init__(self) -> None:
        self._outputs: dict[str, np.ndarray] | None = None
        self._plan: list[tuple[bytes, np.ndarray]] = []

    def get(self, outputs: dict[str, np.ndarray]) -> list[tuple[bytes, np.ndarray]]:
        if outputs is self._outputs:
            return self._plan
        plan = []
        for name, batch in outputs.items():
            if batch.dtype.byteorder == ">":  # the wire is little-endian
                batch = batch.astype(batch.dtype.newbyteorder("<"))
            shape = batch.shape[1:]
            tensor = _DTYPE + _varint(_TO_PROTO[batch.dtype])
            if shape:
                tensor += _length_delimited(_SHAPE, b"".join(_int64(d) for d in shape))
            nbytes = batch.dtype.itemsize * math.prod(shape)
            if nbytes:
                tensor += _DATA + _varint(nbytes)
            value_len = len(tensor) + nbytes
            entry = _length_delimited(_KEY, name.encode()) + _VALUE + _varint(value_len)
            plan.append((_OUTPUTS + _varint(len(entry) + value_len) + entry + tensor, batch))
        self._outputs, self._plan = outputs, plan
        return plan


_plans = _Plans()


def step_response(outcome: Outcome) -> bytes:
    """An applied step's ``StepResponse``: its position and its rows of the batch's outputs."""
    parts = [_string(_SESSION_ID_1, outcome.session_id)]
    if outcome.position:
        parts.append(_POSITION + _int64(outcome.position))
    if outcome.outputs:
        row = outcome.row
        for prefix, batch in _plans.get(outcome.outputs):
            parts.append(prefix)
            parts.append(batch[row].tobytes())
    return b"".join(parts)


def step_result(outcome: Outcome, request_id: str) -> bytes:
    """One ``results`` field of a ``StreamStepsResponse``: the reply, or the step's error."""
    if outcome.error is not None:
        body = _length_delimited(_ERROR, step_error(outcome.error).SerializeToString())
    else:
        body = _length_delimited(_RESPONSE, step_response(outcome))
    inner = _string(_REQUEST_ID, request_id) + _string(_SESSION_ID_2, outcome.session_id) + body
    return _length_delimited(_RESULTS, inner)


def serialize(message: Message | bytes) -> bytes:
    """The response serializer of every method: bytes written here pass through unchanged."""
    if type(message) is bytes:
        return message
    return message.SerializeToString()  # type: ignore[union-attr]
