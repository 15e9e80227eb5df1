"""The error family and its one mapping to and from gRPC status (details encoded as orchestrator.v1.status says)."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from orchestrator.core.calls import CallContext
from orchestrator.v1.status import Trailers, decode_status, encode_status

__all__ = [
    "Cancelled",
    "ChannelClosed",
    "CircuitOpen",
    "DeadlineExceeded",
    "InferenceError",
    "InvalidRequest",
    "OrchestratorError",
    "OtherError",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "StartupError",
    "Unauthenticated",
    "WireStatus",
    "decode_status",  # the wire convention itself lives with the protocol (orchestrator.v1.status)
    "from_rpc_error",
    "to_status",
]


class StartupError(Exception):
    """A process cannot start with its configuration and data (a bad index, a bad corpus): the message is for the
    operator, and the process exits with it instead of a traceback."""


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


class RateLimited(OrchestratorError):
    """A tenant is over its request rate or its concurrent streams: refused before any work, with a retry hint.
    Distinct from ``Overloaded``: the mesh has room, this tenant has used its share."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"


class Unauthenticated(OrchestratorError):
    """No credentials, or credentials the mesh does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(OrchestratorError):
    """Known credentials, for something they do not allow."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


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
        RateLimited,
        Unauthenticated,
        PermissionDenied,
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
    trailing_metadata: Trailers = ()

    def set_on(self, context: CallContext) -> None:
        """End ``context``'s call with this status when its handler returns. Before any message gRPC sends
        it trailers-only, as it would an abort. Not ``abort()``: grpc.aio keeps the exception it raises on the
        call's state, and that exception's traceback holds the handler's frames and so the context: a
        reference cycle per failed call, freed only by a full garbage collection."""
        context.set_code(self.code)
        context.set_details(self.details)
        context.set_trailing_metadata(self.trailing_metadata)


def to_status(err: OrchestratorError) -> WireStatus:
    """Encode an error as a gRPC status with ErrorInfo/RetryInfo details and plain trailers."""
    trailers = encode_status(
        err.code, err.message, err.reason, stage=err.stage, retry_after_s=err.retry_after_s, metadata=err.metadata
    )
    return WireStatus(err.code, err.message, trailers)


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
