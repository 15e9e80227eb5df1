"""The one error type the client raises."""

from __future__ import annotations

import grpc

from orchestrator.v1.status import decode_status


class OrchestratorRpcError(Exception):
    """A failed call, with what the mesh said about it.

    ``code`` is the gRPC status; ``stage`` names the stage that failed or shed the
    request (when known); ``retry_after_s`` is the server's retry hint for sheds.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        stage: str = "",
        reason: str = "",
        retry_after_s: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        where = f" (stage {stage})" if stage else ""
        super().__init__(f"{code.name}{where}: {message}")
        self.code = code
        self.message = message
        self.stage = stage
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})

    @classmethod
    def from_call_error(cls, err: grpc.RpcError) -> OrchestratorRpcError:
        code = err.code()
        decoded = decode_status(code, err.details(), err.trailing_metadata())
        return cls(
            code,
            decoded.message,
            stage=decoded.stage,
            reason=decoded.reason,
            retry_after_s=decoded.retry_after_s,
            metadata=decoded.metadata,
        )
