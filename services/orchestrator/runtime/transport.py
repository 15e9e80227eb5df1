"""The one place that decides how a stage reaches a replica of the next: a plain gRPC call per request,
or a call on a stage link (``server.stage_links``).

Each transport owns the channel it opened and closes it with itself; ``Downstream`` sees only the
``Transport`` protocol, so a new transport is added here and nowhere in the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from orchestrator.core.calls import Call, Metadata, Transport, channel_options
from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import CALLEE, Stage, stage
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.link import LinkClient
from orchestrator.runtime.replicas import Replicas
from orchestrator.runtime.security import callee_name_options, channel_credentials
from orchestrator.v1 import stages_pb2_grpc, types_pb2


async def serving(channel: grpc.aio.Channel, timeout_s: float) -> bool:
    """Whether the server behind ``channel`` answers SERVING (``grpc.health.v1``) within ``timeout_s``."""
    try:
        reply = await HealthStub(channel).Check(HealthCheckRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == HealthCheckResponse.SERVING)


class PlainTransport:
    """One gRPC call of the callee's RPC per request."""

    def __init__(self, channel: grpc.aio.Channel, method: Any) -> None:
        self._channel = channel
        self._method = method

    async def healthy(self, timeout_s: float) -> bool:
        return await serving(self._channel, timeout_s)

    def __call__(
        self, request: types_pb2.PromptRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Call:
        call: Call = self._method(request, timeout=timeout, metadata=metadata)
        return call

    async def close(self) -> None:
        await self._channel.close()


class LinkTransport(LinkClient[Any]):
    """Calls on one stage link to the replica (falling back to its RPC if it serves no links)."""

    def __init__(
        self, channel: grpc.aio.Channel, callee: Stage, method: Any, telemetry: Telemetry, max_message_bytes: int
    ) -> None:
        super().__init__(
            channel, callee.name, callee.output.FromString, method, telemetry, max_message_bytes=max_message_bytes
        )
        self._channel = channel

    async def healthy(self, timeout_s: float) -> bool:
        return await serving(self._channel, timeout_s)

    async def close(self) -> None:
        await super().close()
        await self._channel.close()


def connect(caller: str, callee: Stage, address: str, cfg: MeshConfig, telemetry: Telemetry) -> Transport:
    """A transport from ``caller`` to the replica of ``callee`` at ``address``, as ``cfg`` configures hops:
    mutual TLS when the mesh has certificates, each end checking the other's stage name."""
    options = channel_options(cfg.server, cfg.network)
    credentials = channel_credentials(cfg.tls, caller)
    if credentials is None:
        channel = grpc.aio.insecure_channel(address, options=options)
    else:
        options += callee_name_options(cfg.tls, callee.name)
        channel = grpc.aio.secure_channel(address, credentials, options=options)
    method = getattr(getattr(stages_pb2_grpc, f"{callee.service}Stub")(channel), callee.method)
    if cfg.server.stage_links:
        return LinkTransport(channel, callee, method, telemetry, cfg.server.max_message_bytes)
    return PlainTransport(channel, method)


def downstream_of(caller: str, cfg: MeshConfig, telemetry: Telemetry) -> Downstream[Any]:
    """The calls ``caller`` makes to its callee's replicas, as configured."""
    if caller not in CALLEE:
        raise ValueError(f"the {caller} stage calls no other stage")
    callee = stage(CALLEE[caller])
    addresses: Sequence[str] = cfg.stage(callee.name).addresses()
    transports = {addr: connect(caller, callee, addr, cfg, telemetry) for addr in addresses}
    return Downstream(Replicas(callee.name, transports, cfg.network, telemetry), callee.rpc, telemetry)
