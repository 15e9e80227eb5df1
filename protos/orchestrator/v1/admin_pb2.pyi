from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: str
    def __init__(self, worker: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueStatus(_message.Message):
    __slots__ = ("capacity", "concurrency", "waiting", "active", "concurrency_max", "max_queue_wait_ms")
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_MAX_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    capacity: int
    concurrency: int
    waiting: int
    active: int
    concurrency_max: int
    max_queue_wait_ms: int
    def __init__(self, capacity: _Optional[int] = ..., concurrency: _Optional[int] = ..., waiting: _Optional[int] = ..., active: _Optional[int] = ..., concurrency_max: _Optional[int] = ..., max_queue_wait_ms: _Optional[int] = ...) -> None: ...

class Counters(_message.Message):
    __slots__ = ("admitted", "shed", "ok", "failed", "cancelled", "invalid", "denied", "rate_limited")
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    SHED_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    INVALID_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITED_FIELD_NUMBER: _ClassVar[int]
    admitted: int
    shed: int
    ok: int
    failed: int
    cancelled: int
    invalid: int
    denied: int
    rate_limited: int
    def __init__(self, admitted: _Optional[int] = ..., shed: _Optional[int] = ..., ok: _Optional[int] = ..., failed: _Optional[int] = ..., cancelled: _Optional[int] = ..., invalid: _Optional[int] = ..., denied: _Optional[int] = ..., rate_limited: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("name", "active", "tokens_generated", "last_generation_end_unix_nanos")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    LAST_GENERATION_END_UNIX_NANOS_FIELD_NUMBER: _ClassVar[int]
    name: str
    active: int
    tokens_generated: int
    last_generation_end_unix_nanos: int
    def __init__(self, name: _Optional[str] = ..., active: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., last_generation_end_unix_nanos: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("stage", "queue", "counters", "worker", "callees", "replica", "process", "serving")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    CALLEES_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    stage: str
    queue: QueueStatus
    counters: Counters
    worker: WorkerStatus
    callees: _containers.RepeatedCompositeFieldContainer[CalleeReplica]
    replica: str
    process: str
    serving: str
    def __init__(self, stage: _Optional[str] = ..., queue: _Optional[_Union[QueueStatus, _Mapping]] = ..., counters: _Optional[_Union[Counters, _Mapping]] = ..., worker: _Optional[_Union[WorkerStatus, _Mapping]] = ..., callees: _Optional[_Iterable[_Union[CalleeReplica, _Mapping]]] = ..., replica: _Optional[str] = ..., process: _Optional[str] = ..., serving: _Optional[str] = ...) -> None: ...

class CalleeReplica(_message.Message):
    __slots__ = ("stage", "address", "ejected")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    stage: str
    address: str
    ejected: bool
    def __init__(self, stage: _Optional[str] = ..., address: _Optional[str] = ..., ejected: _Optional[bool] = ...) -> None: ...
