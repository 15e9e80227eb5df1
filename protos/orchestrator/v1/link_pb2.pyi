from orchestrator.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LinkFrames(_message.Message):
    __slots__ = ("frames",)
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    frames: _containers.RepeatedCompositeFieldContainer[LinkFrame]
    def __init__(self, frames: _Optional[_Iterable[_Union[LinkFrame, _Mapping]]] = ...) -> None: ...

class LinkFrame(_message.Message):
    __slots__ = ("call_id", "call", "message", "status", "cancel", "credit")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    call: LinkCall
    message: bytes
    status: LinkStatus
    cancel: LinkCancel
    credit: LinkCredit
    def __init__(self, call_id: _Optional[int] = ..., call: _Optional[_Union[LinkCall, _Mapping]] = ..., message: _Optional[bytes] = ..., status: _Optional[_Union[LinkStatus, _Mapping]] = ..., cancel: _Optional[_Union[LinkCancel, _Mapping]] = ..., credit: _Optional[_Union[LinkCredit, _Mapping]] = ...) -> None: ...

class LinkCall(_message.Message):
    __slots__ = ("request", "timeout_us", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    request: _types_pb2.PromptRequest
    timeout_us: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[_types_pb2.PromptRequest, _Mapping]] = ..., timeout_us: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LinkStatus(_message.Message):
    __slots__ = ("code", "message", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    details: bytes
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., details: _Optional[bytes] = ...) -> None: ...

class LinkCancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinkCredit(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: int
    def __init__(self, messages: _Optional[int] = ...) -> None: ...
