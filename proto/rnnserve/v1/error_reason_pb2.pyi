from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    VERSION_NOT_FOUND: _ClassVar[ErrorReason]
    SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    SESSION_EXPIRED: _ClassVar[ErrorReason]
    SESSION_EVICTED: _ClassVar[ErrorReason]
    SESSION_CLOSED: _ClassVar[ErrorReason]
    SESSION_EXISTS: _ClassVar[ErrorReason]
    CAPACITY_REACHED: _ClassVar[ErrorReason]
    QUEUE_FULL: _ClassVar[ErrorReason]
    QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    INVALID_TENSOR: _ClassVar[ErrorReason]
    INVALID_REQUEST: _ClassVar[ErrorReason]
    POSITION_MISMATCH: _ClassVar[ErrorReason]
    SESSION_CHANGED: _ClassVar[ErrorReason]
    SHUTTING_DOWN: _ClassVar[ErrorReason]
    DRAINING: _ClassVar[ErrorReason]
    SESSION_MOVING: _ClassVar[ErrorReason]
    STATE_STORE_UNAVAILABLE: _ClassVar[ErrorReason]
    UNAUTHENTICATED: _ClassVar[ErrorReason]
    POSITION_LIMIT: _ClassVar[ErrorReason]
    INTERNAL: _ClassVar[ErrorReason]
    VERSION_RETIRING: _ClassVar[ErrorReason]
    ADMIN_REQUIRED: _ClassVar[ErrorReason]
    STATE_INCOMPATIBLE: _ClassVar[ErrorReason]
    SESSION_BUSY: _ClassVar[ErrorReason]
    VERSION_NOT_READY: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
MODEL_NOT_FOUND: ErrorReason
VERSION_NOT_FOUND: ErrorReason
SESSION_NOT_FOUND: ErrorReason
SESSION_EXPIRED: ErrorReason
SESSION_EVICTED: ErrorReason
SESSION_CLOSED: ErrorReason
SESSION_EXISTS: ErrorReason
CAPACITY_REACHED: ErrorReason
QUEUE_FULL: ErrorReason
QUOTA_EXCEEDED: ErrorReason
INVALID_TENSOR: ErrorReason
INVALID_REQUEST: ErrorReason
POSITION_MISMATCH: ErrorReason
SESSION_CHANGED: ErrorReason
SHUTTING_DOWN: ErrorReason
DRAINING: ErrorReason
SESSION_MOVING: ErrorReason
STATE_STORE_UNAVAILABLE: ErrorReason
UNAUTHENTICATED: ErrorReason
POSITION_LIMIT: ErrorReason
INTERNAL: ErrorReason
VERSION_RETIRING: ErrorReason
ADMIN_REQUIRED: ErrorReason
STATE_INCOMPATIBLE: ErrorReason
SESSION_BUSY: ErrorReason
VERSION_NOT_READY: ErrorReason
