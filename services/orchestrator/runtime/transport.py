"""The one place that decides how a stage reaches a replica of the next: a plain gRPC call per request,
or a call on a stage link (``server.stage_links``).

Each transport owns the channel it opened and closes it with itself; ``Downstream`` sees only the
``Transport`` protocol, so a new transport is added here and nowhere in the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import grpc
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from orchestrator.core.calls import Call, Handler, Metadata, Transport, channel_options
from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import CALLEE, Stage, stage
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.colocated import COLOCATED
from orchestrator.runtime.discovery import Discovery, resolve_now, split_endpoints
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.link import LinkClient, LinkContext
from orchestrator.runtime.replicas import CountedCall, Replicas
from orchestrator.runtime.security import callee_name_options, caller_files, channel_credentials, files_stamp
from orchestrator.v1 import stages_pb2_grpc, types_pb2

log = logging.getLogger(__name__)


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


class RenewingTransport:
    """Calls to a replica over TLS, on a transport made again when this stage's certificate files change.

    gRPC fixes a channel's credentials when it is made, and a connection shows its certificate once, at its
    handshake: a renewed certificate would otherwise reach no connection until the process restarts, and an
    expired one would fail the first reconnect. Checked at most once a second as calls are made; calls already
    under way finish on the transport they started on, which is closed when the last of them is over.
    """

    CHECK_S = 1.0

    def __init__(self, make: Callable[[], Transport], files: Sequence[str], what: str) -> None:
        self._make = make
        self._files = files
        self._what = what
        self._stamp = files_stamp(files)
        self._checked = time.monotonic()
        self._current = make()
        self._calls: dict[Transport, int] = {self._current: 0}
        self._closing: set[asyncio.Task[None]] = set()
        self.renewals = 0

    def __call__(
        self, request: types_pb2.PromptRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Call:
        self._renew_if_changed()
        transport = self._current
        call = transport(request, timeout=timeout, metadata=metadata)
        self._calls[transport] += 1
        return CountedCall(call, partial(self._ended, transport))

    async def healthy(self, timeout_s: float) -> bool:
        self._renew_if_changed()
        return await self._current.healthy(timeout_s)

    def _renew_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.CHECK_S:
            return
        self._checked = now
        stamp = files_stamp(self._files)
        if stamp == self._stamp:
            return
        try:
            fresh = self._make()
        except OSError as exc:  # mid-rotation: keep the transport we have, try again next time
            log.error("TLS files unreadable, keeping the current connection to %s: %s", self._what, exc)
            return
        old, self._current, self._stamp = self._current, fresh, stamp
        self._calls[fresh] = 0
        self.renewals += 1
        log.info("TLS certificate renewed: new connections to %s show it", self._what)
        if self._calls[old] == 0:
            self._retire(old)

    def _ended(self, transport: Transport) -> None:
        self._calls[transport] -= 1
        if self._calls[transport] == 0 and transport is not self._current:
            self._retire(transport)

    def _retire(self, transport: Transport) -> None:
        del self._calls[transport]
        task = asyncio.ensure_future(transport.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for transport in list(self._calls):
            await transport.close()
        self._calls.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# Messages a colocated callee may have ready before its caller reads them (as a link's per-call credit).
LOCAL_WINDOW = 64

Status = tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]


class LocalCall:
    """One call to a stage in this process: its handler (the stage's own RPC method, so admission, spans, metrics and
    errors are the stage's) runs in a task of its own, as a gRPC call would on the server, and its messages reach
    the caller as objects, up to ``LOCAL_WINDOW`` ahead of it: no serialization, no gRPC, the same meaning."""

    def __init__(
        self,
        handler: Handler,
        request: types_pb2.PromptRequest,
        timeout: float | None,
        metadata: Metadata | None,
        caller: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        # The callee sees its caller as a certificate naming it would show it: the caller is this process.
        auth = {"x509_subject_alternative_name": [caller.encode()]}
        self._context = LinkContext(tuple(metadata or ()), timeout, auth)
        # The request is the caller's own object, which its stage validated already: no need to again.
        self._context.validated = True
        self._buffer: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()  # a message, or the end
        self._room = asyncio.Event()  # the caller took a message
        self._status: Status | None = None
        self._expired = False
        self._task = loop.create_task(self._run(handler, request))
        self._timer = loop.call_later(timeout, self._expire) if timeout is not None else None

    async def _run(self, handler: Handler, request: types_pb2.PromptRequest) -> None:
        try:
            async for message in handler(request, self._context):
                while len(self._buffer) >= LOCAL_WINDOW:
                    self._room.clear()
                    await self._room.wait()
                self._buffer.append(message)
                self._ready.set()
            ctx = self._context
            self._status = (ctx.code, ctx.details, tuple(ctx.trailing_metadata))
        except asyncio.CancelledError:
            expired = self._expired
            self._status = (
                grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED,
                "Deadline Exceeded" if expired else "Cancelled",
                (),
            )
        except Exception:  # a bug in the callee: what gRPC would answer for it
            log.exception("in-process call to a colocated stage failed")
            self._status = (grpc.StatusCode.INTERNAL, "internal error", ())
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._ready.set()

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def read(self) -> Any:
        """The next message, ``grpc.aio.EOF`` after an OK status, or the status raised as an ``AioRpcError``."""
        while not self._buffer:
            if self._status is not None:
                return self._finish(self._status)
            self._ready.clear()
            await self._ready.wait()
        message = self._buffer.popleft()
        self._room.set()
        return message

    @staticmethod
    def _finish(status: Status) -> Any:
        code, details, trailers = status
        if code == grpc.StatusCode.OK:
            return grpc.aio.EOF
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details=details)

    def cancel(self) -> bool:
        if self._task.done():
            return False
        self._task.cancel()
        return True


class LocalTransport:
    """Calls to a stage that runs in this process (a colocated layout): its handler, in memory."""

    def __init__(self, handler: Handler, caller: str) -> None:
        self._handler = handler
        self._caller = caller

    def __call__(
        self, request: types_pb2.PromptRequest, *, timeout: float | None = None, metadata: Metadata | None = None
    ) -> Call:
        return LocalCall(self._handler, request, timeout, metadata, self._caller)

    async def healthy(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        pass


def connect(caller: str, callee: Stage, address: str, *, cfg: MeshConfig, telemetry: Telemetry) -> Transport:
    """A transport from ``caller`` to the replica of ``callee`` at ``address``, as ``cfg`` configures hops:
    mutual TLS when the mesh has certificates, each end checking the other's stage name, made again when the
    caller's certificate is renewed."""
    if cfg.tls.enabled:
        make = partial(_connect, caller, callee, address, cfg, telemetry)
        what = f"the {callee.name} stage at {address}"
        return RenewingTransport(make, caller_files(cfg.tls, caller), what)
    return _connect(caller, callee, address, cfg, telemetry)


def _connect(caller: str, callee: Stage, address: str, cfg: MeshConfig, telemetry: Telemetry) -> Transport:
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
    colocated = COLOCATED.get()
    if callee.name in colocated:  # the callee runs in this process: in memory, one replica, nothing to discover
        local = LocalTransport(colocated[callee.name], caller)
        return Downstream(Replicas(callee.name, {"in-process": local}, cfg.network, telemetry), callee.rpc, telemetry)
    fixed, names = split_endpoints(cfg.stage(callee.name).addresses())
    addresses: Sequence[str] = [*fixed, *resolve_now(names)]
    make = partial(connect, caller, callee, cfg=cfg, telemetry=telemetry)
    transports = {addr: make(addr) for addr in addresses}
    replicas = Replicas(callee.name, transports, cfg.network, telemetry, connect=make)
    discovery = Discovery(replicas, fixed, names, cfg.network) if names else None
    return Downstream(replicas, callee.rpc, telemetry, discovery)
