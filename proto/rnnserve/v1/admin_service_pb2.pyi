from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    AVAILABLE: _ClassVar[VersionState]
    LOADING: _ClassVar[VersionState]
    READY: _ClassVar[VersionState]
    RETIRING: _ClassVar[VersionState]
    RETIRED: _ClassVar[VersionState]
    FAILED: _ClassVar[VersionState]
VERSION_STATE_UNSPECIFIED: VersionState
AVAILABLE: VersionState
LOADING: VersionState
READY: VersionState
RETIRING: VersionState
RETIRED: VersionState
FAILED: VersionState

class VersionStatus(_message.Message):
    __slots__ = ("model", "version", "on_disk", "state", "reason", "live_sessions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ON_DISK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    on_disk: bool
    state: VersionState
    reason: str
    live_sessions: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., on_disk: _Optional[bool] = ..., state: _Optional[_Union[VersionState, str]] = ..., reason: _Optional[str] = ..., live_sessions: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class RetireModelRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RetireModelResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: VersionStatus
    def __init__(self, version: _Optional[_Union[VersionStatus, _Mapping]] = ...) -> None: ...

class RepositoryIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RepositoryIndexResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class MoveSessionRequest(_message.Message):
    __slots__ = ("session_id", "version", "owner")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    version: str
    owner: str
    def __init__(self, session_id: _Optional[str] = ..., version: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class MoveSessionResponse(_message.Message):
    __slots__ = ("session_id", "model", "version", "position")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: str
    position: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[str] = ..., position: _Optional[int] = ...) -> None: ...
