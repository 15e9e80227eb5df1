"""The error family and its one mapping to and from gRPC status (rich google.rpc.Status details)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "prompt-orchestrator"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
# Plain trailers as well as the rich status, so that clients without the
# google.rpc protos (or a grpcurl user) still see the stage and retry hint.
STAGE_KEY = "orchestrator-stage"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class OrchestratorError(Exception):
    """Base of every error the mesh reports; ``message`` is safe to show to callers."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        stage: str = "",
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, stage={self.stage!r})"


class InvalidRequest(OrchestratorError):
    """The request is malformed or outside the configured limits."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class Overloaded(OrchestratorError):
    """A stage's admission queue is full: the request was shed before any work."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class ChannelClosed(OrchestratorError):
    """A downstream stage could not be reached or dropped the stream."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "CHANNEL_CLOSED"


class CircuitOpen(ChannelClosed):
    """A model backend kept failing: its circuit breaker fails requests fast for a while (not retried)."""

    reason = "CIRCUIT_OPEN"


class DeadlineExceeded(OrchestratorError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Cancelled(OrchestratorError):
    """The caller cancelled the request."""

    code = grpc.StatusCode.CANCELLED
    reason = "CANCELLED"


class InferenceError(OrchestratorError):
    """The model worker failed."""

    code = grpc.StatusCode.INTERNAL
    reason = "INFERENCE"


class OtherError(OrchestratorError):
    """Anything else; the message must still be safe to show."""

    code = grpc.StatusCode.INTERNAL
    reason = "OTHER"


_BY_REASON: dict[str, type[OrchestratorError]] = {
    cls.reason: cls
    for cls in (
        InvalidRequest,
        Overloaded,
        ChannelClosed,
        CircuitOpen,
        DeadlineExceeded,
        Cancelled,
        InferenceError,
        OtherError,
    )
}


@dataclass(frozen=True)
class WireStatus:
    """A status with its details, ready to end a call with."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    def set_on(self, context: Any) -> None:
        """End ``context``'s call with this status when its handler returns. Before any message gRPC sends
        it trailers-only, as it would an abort. Not ``abort()``: grpc.aio keeps the exception it raises on the
        call's state, and that exception's traceback holds the handler's frames and so the context: a
        reference cycle per failed call, freed only by a full garbage collection."""
        context.set_code(self.code)
        context.set_details(self.details)
        context.set_trailing_metadata(self.trailing_metadata)


def to_status(err: OrchestratorError) -> WireStatus:
    """Encode an error as a gRPC status with ErrorInfo/RetryInfo details and plain trailers."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN)
    if err.stage:
        info.metadata["stage"] = err.stage
    for key, value in err.metadata.items():
        info.metadata[key] = value
    details = [info]
    trailers: list[tuple[str, str | bytes]] = []
    if err.stage:
        trailers.append((STAGE_KEY, err.stage))
    if err.retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(round(err.retry_after_s * 1000))
        details.append(retry)
        trailers.append((RETRY_PUSHBACK_KEY, str(round(err.retry_after_s * 1000))))
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    return WireStatus(err.code, err.message, tuple(trailers))


@dataclass(frozen=True)
class DecodedStatus:
    """What a caller can learn from a failed call's status and trailers."""

    code: grpc.StatusCode
    message: str
    reason: str
    stage: str
    retry_after_s: float | None
    metadata: dict[str, str]


def decode_status(
    code: grpc.StatusCode, details: str | None, trailing_metadata: Sequence[tuple[str, str | bytes]] | None
) -> DecodedStatus:
    """Read our ErrorInfo/RetryInfo (or the plain trailers) back from a call's status."""
    reason, stage, retry_after_s, metadata = "", "", None, {}
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for packed in status.details:
                info = error_details_pb2.ErrorInfo()
                retry = error_details_pb2.RetryInfo()
                if packed.Unpack(info) and info.domain == ERROR_DOMAIN:
                    reason = info.reason
                    metadata = dict(info.metadata)
                    stage = metadata.pop("stage", stage)
                elif packed.Unpack(retry):
                    retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
        elif key == STAGE_KEY and not stage:
            stage = value if isinstance(value, str) else value.decode()
        elif key == RETRY_PUSHBACK_KEY and retry_after_s is None:
            with contextlib.suppress(ValueError):
                retry_after_s = int(value) / 1000
    return DecodedStatus(code, details or "", reason, stage, retry_after_s, metadata)


def from_rpc_error(err: grpc.aio.AioRpcError, callee: str, what: str = "") -> OrchestratorError:
    """Rebuild the error a downstream stage reported, so it passes up the chain unchanged.

    Statuses produced by gRPC itself (connection lost, deadline) carry no ErrorInfo;
    they are attributed to ``callee``, the stage we were calling, and described as
    ``what`` (default: "<callee> stage").
    """
    decoded = decode_status(err.code(), err.details(), err.trailing_metadata())
    cls = _BY_REASON.get(decoded.reason)
    if cls is not None:
        return cls(
            decoded.message,
            stage=decoded.stage,
            retry_after_s=decoded.retry_after_s,
            metadata=decoded.metadata,
        )
    what = what or f"{callee} stage"
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return ChannelClosed(f"{what} is unavailable", stage=callee)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for the {what}", stage=callee)
    if code == grpc.StatusCode.CANCELLED:
        return Cancelled(f"call to the {what} was cancelled", stage=callee)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{what} is out of resources", stage=callee)
    return OtherError(f"{what} failed ({code.name})", stage=callee)
