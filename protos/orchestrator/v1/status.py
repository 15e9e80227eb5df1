"""How a failed call says what happened, beyond its gRPC code: both ends of the convention.

A status carries a ``google.rpc.Status`` in ``grpc-status-details-bin`` with an ``ErrorInfo`` (our reason,
the stage, and more metadata) and, for a retryable refusal, a ``RetryInfo``. The stage and the retry hint
also travel as plain trailers (``orchestrator-stage``, ``grpc-retry-pushback-ms``, the latter read by
gRPC's own retry machinery), so a client without the google.rpc protos, grpcurl included, still sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "prompt-orchestrator"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
STAGE_KEY = "orchestrator-stage"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

Trailers = tuple[tuple[str, str | bytes], ...]


def encode_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    *,
    stage: str = "",
    retry_after_s: float | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Trailers:
    """The trailing metadata that carries a status's details: the rich status and the plain trailers."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN)
    if stage:
        info.metadata["stage"] = stage
    for key, value in (metadata or {}).items():
        info.metadata[key] = value
    details: list[error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo] = [info]
    trailers: list[tuple[str, str | bytes]] = []
    if stage:
        trailers.append((STAGE_KEY, stage))
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromMilliseconds(round(retry_after_s * 1000))
        details.append(retry)
        trailers.append((RETRY_PUSHBACK_KEY, str(round(retry_after_s * 1000))))
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details:
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    trailers.append((STATUS_DETAILS_KEY, status.SerializeToString()))
    return tuple(trailers)


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
