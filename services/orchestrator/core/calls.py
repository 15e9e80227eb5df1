"""The call seam: what a stage's handler is given, what a call to the next stage looks like, and the shape
every transport between stages has (a plain gRPC call per request, a stage link, ...).

The runtime sees only these protocols, so a transport is added without touching it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import grpc

from orchestrator.core.config import ServerConfig
from orchestrator.v1 import types_pb2

Metadata = Sequence[tuple[str, str]]

Options = tuple[tuple[str, Any], ...]

# Reconnect quickly after a stage restarts instead of gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS: Options = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
)


def message_limits(server: ServerConfig) -> Options:
    """Both ends of every hop accept and send messages up to the same size, from one setting."""
    return (
        ("grpc.max_receive_message_length", server.max_message_bytes),
        ("grpc.max_send_message_length", server.max_message_bytes),
    )


def channel_options(server: ServerConfig) -> Options:
    """Options of a channel from one stage to the next."""
    return CHANNEL_OPTIONS + message_limits(server)


class CallContext(Protocol):
    """What the runtime asks of an incoming call's context: a ``grpc.aio.ServicerContext`` for a call of the
    stage's RPC, or the context a transport gives a call that reached the stage another way.

    A failed call sets its status and returns rather than calling ``abort()`` (see ``WireStatus.set_on``).
    """

    def invocation_metadata(self) -> Any: ...

    def time_remaining(self) -> float | None: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None: ...


# A stage's RPC method: the request and its context in, the stage's output messages out.
Handler = Callable[[types_pb2.PromptRequest, CallContext], AsyncIterator[Any]]


class Call(Protocol):
    """One call to the next stage, read like a ``grpc.aio`` server-streaming call."""

    async def read(self) -> Any:
        """The next message, ``grpc.aio.EOF`` after an OK status, or raises the status as an ``AioRpcError``."""
        ...

    def cancel(self) -> bool:
        """Stop the call at the callee; False if it had already ended."""
        ...


class Transport(Protocol):
    """Calls to one replica of the next stage."""

    def __call__(
        self, request: types_pb2.PromptRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Call: ...

    async def close(self) -> None:
        """Stop using the replica: close what the transport opened."""
        ...
