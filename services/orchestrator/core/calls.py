"""The call seam: what a stage's handler is given, what a call to the next stage looks like, and the shape
every transport between stages has (a plain gRPC call per request, a stage link, ...).

The runtime sees only these protocols, so a transport is added without touching it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from typing import Any, Protocol

import grpc

from orchestrator.core.config import NetworkConfig, ServerConfig, StageConfig, StreamConfig
from orchestrator.v1 import types_pb2

Metadata = Sequence[tuple[str, str]]

# The call metadata that carries a request's tenant from stage to stage. The edge never reads it from a client: it
# sets it from the API key the client showed.
TENANT_KEY = "orchestrator-tenant"
# A replayed dead letter's request carries these: the letter's id, and the original's trace and span ids
# (``<trace id>-<span id>``, hex) that the edge's span links to.
REPLAY_OF_KEY = "orchestrator-replay-of"
REPLAY_TRACE_KEY = "orchestrator-replay-trace"
# The tenant of the request the current task serves ("" without keys): set by the runtime as a call is accepted,
# sent on with every call to the next stage.
TENANT: ContextVar[str] = ContextVar("orchestrator_tenant", default="")

Options = tuple[tuple[str, Any], ...]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def message_limits(server: ServerConfig) -> Options:
    """Both ends of every hop accept and send messages up to the same size, from one setting."""
    return (
        ("grpc.max_receive_message_length", server.max_message_bytes),
        ("grpc.max_send_message_length", server.max_message_bytes),
    )


def keepalive(network: NetworkConfig) -> Options:
    """Pings on every connection, idle or not, so a peer that went silent (a partition sends no reset) is noticed
    within ``keepalive_time_s + keepalive_timeout_s``. Used by callers and servers alike: a server pings its
    clients too, to notice one that vanished."""
    return (
        ("grpc.keepalive_time_ms", _ms(network.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(network.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # an idle link keeps pinging
    )


def channel_options(server: ServerConfig, network: NetworkConfig) -> Options:
    """Options of a channel from one stage to the next: message limits, keepalive, and a quick reconnect after
    a stage restarts instead of gRPC's default backoff of up to two minutes."""
    return (
        *message_limits(server),
        *keepalive(network),
        ("grpc.initial_reconnect_backoff_ms", _ms(network.reconnect_backoff_s)),
        ("grpc.max_reconnect_backoff_ms", _ms(network.max_reconnect_backoff_s)),
        ("grpc.min_reconnect_backoff_ms", _ms(network.connect_timeout_s)),  # gRPC's minimum connect timeout
    )


def ping_policy(network: NetworkConfig) -> Options:
    """What a server accepts of its peers' pings: callers ping every ``keepalive_time_s`` with or without data,
    and a server that allowed less would answer with GOAWAY ``too_many_pings`` (gRPC's default allows one ping
    in five minutes without data), cutting an idle link and doubling the caller's ping interval."""
    return (
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(network.keepalive_time_s / 2)),
        ("grpc.http2.min_time_between_pings_ms", _ms(network.keepalive_time_s / 2)),
        ("grpc.keepalive_permit_without_calls", 1),
    )


def server_options(server: ServerConfig, network: NetworkConfig) -> Options:
    """A process's gRPC server options, from config: message limits, keepalive pings to its clients (to notice
    one that vanished), the ping rate it permits its callers, and the backlog of calls not yet picked up.

    gRPC holds calls that arrive faster than the process picks them up in a backlog; past
    ``grpc.server.max_pending_requests`` (1000 by default) it cancels a growing share of them at random
    (CANCELLED, no trailers, before any of our code runs: uncounted, unattributed). Measured on a bare
    grpc.aio server holding its calls: 5 of a burst of 1,100 and 730 of 3,000 cancelled so. With the backlog
    sized by ``server.max_pending_calls`` every call of such a burst reaches the stage, whose admission
    answers it (admitted, or shed with its status).
    """
    return (
        *message_limits(server),
        *keepalive(network),
        *ping_policy(network),
        ("grpc.server.max_pending_requests", server.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * server.max_pending_calls),
    )


def connection_limits(stage: StageConfig) -> Options:
    """How many connections a stage accepts, and (at the edge, which faces clients) how long and how busy each may
    be. Every connection costs gRPC ~20 KiB (measured on a bare grpc.aio server), so the bound is what keeps a
    connection flood from costing the process its memory: a connection over it is refused (clients see
    UNAVAILABLE), one idle too long is closed. Never an age limit between stages: a stage link lives as long as
    its connection."""
    out: list[tuple[str, Any]] = []
    if stage.max_connections:
        out.append(("grpc.max_allowed_incoming_connections", stage.max_connections))
    if isinstance(stage, StreamConfig):
        out.append(("grpc.max_concurrent_streams", stage.max_streams_per_connection))
        if stage.max_connection_idle_s:
            out.append(("grpc.max_connection_idle_ms", _ms(stage.max_connection_idle_s)))
        if stage.max_connection_age_s:
            out.append(("grpc.max_connection_age_ms", _ms(stage.max_connection_age_s)))
            out.append(("grpc.max_connection_age_grace_ms", _ms(stage.max_connection_age_s)))
    return tuple(out)


class CallContext(Protocol):
    """What the runtime asks of an incoming call's context: a ``grpc.aio.ServicerContext`` for a call of the
    stage's RPC, or the context a transport gives a call that reached the stage another way.

    A failed call sets its status and returns rather than calling ``abort()`` (see ``WireStatus.set_on``).
    """

    def invocation_metadata(self) -> Any: ...

    def auth_context(self) -> Mapping[str, Sequence[bytes]]:
        """What TLS established about the caller (``x509_subject_alternative_name``, ...); empty in plaintext."""
        ...

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

    async def healthy(self, timeout_s: float) -> bool:
        """Whether the replica answers SERVING to a health check within ``timeout_s``."""
        ...

    async def close(self) -> None:
        """Stop using the replica: close what the transport opened."""
        ...
