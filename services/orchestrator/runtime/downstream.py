"""Calls to the next stage down the chain: replica choice, deadline propagation, explicit cancellation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from functools import partial
from typing import Any, Generic, TypeVar

import grpc

from orchestrator.affinity import rendezvous_order
from orchestrator.errors import DeadlineExceeded, from_rpc_error
from orchestrator.runtime.link import CallContext, LinkClient
from orchestrator.runtime.telemetry import Telemetry, mark_span
from orchestrator.v1 import types_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")

# Reconnect quickly after a stage restarts instead of gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
)


def _cancel(call: Any, _task: object) -> None:
    call.cancel()


class Downstream(Generic[T]):
    """A server-streaming method of the next stage, on one channel per replica.

    The replica is chosen by rendezvous hashing of the session id; a replica that is
    unreachable before it sent anything is skipped for the next. The caller's remaining
    deadline goes with every call, and the call is cancelled explicitly as soon as the
    caller's RPC ends, whatever the reason, rather than at garbage collection. Each call
    gets a CLIENT span whose end and status we set ourselves, so an abandoned stream shows
    as cancelled, not OK.
    """

    def __init__(
        self,
        stage: str,
        addresses: Sequence[str],
        method: Callable[[grpc.aio.Channel], Callable[..., Any]],
        rpc: str = "",
        telemetry: Telemetry | None = None,
        link_output: Callable[[bytes], T] | None = None,
    ) -> None:
        if not addresses:
            raise ValueError(f"no address configured for the {stage} stage")
        self.stage = stage
        self.rpc = rpc or stage
        self.addresses = tuple(addresses)
        self._telemetry = telemetry or Telemetry()
        self._channels = {addr: grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) for addr in self.addresses}
        self._methods: dict[str, Callable[..., Any]] = {}
        for addr, channel in self._channels.items():
            if link_output is None:
                self._methods[addr] = method(channel)
            else:
                # Over a stage link: same request, messages and statuses, no per-call gRPC cost.
                self._methods[addr] = LinkClient(
                    channel, stage, link_output, fallback=method(channel), telemetry=self._telemetry
                )

    async def stream(
        self, request: types_pb2.PromptRequest, context: CallContext | None = None
    ) -> AsyncGenerator[T, None]:
        order = rendezvous_order(request.session.id, self.addresses)
        for attempt, addr in enumerate(order):
            timeout = context.time_remaining() if context is not None else None
            if timeout is not None and timeout <= 0:
                raise DeadlineExceeded(f"deadline exceeded before calling the {self.stage} stage", stage=self.stage)
            span, metadata = self._telemetry.client_span(self.rpc)
            span.set_attribute("net.peer.name", addr)
            call = self._methods[addr](request, timeout=timeout, metadata=metadata or None)
            task = asyncio.current_task() if context is not None else None
            if task is not None:
                # Runs when the task serving our own RPC ends (done, cancelled, deadline): stop the work
                # below at once. The task's callback, not the gRPC context's: grpc.aio keeps a context's
                # done callbacks in a reference cycle with the call's state, so every call's objects
                # (this call, its request) would wait for a full garbage collection to be freed.
                task.add_done_callback(partial(_cancel, call))
            received = False
            finished = False
            try:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        finished = True
                        if len(order) > 1:
                            self._telemetry.record_affinity(self.stage, attempt == 0)
                        return
                    received = True
                    yield message
            except grpc.aio.AioRpcError as err:
                finished = True
                mapped = from_rpc_error(err, self.stage)
                mark_span(span, err.code().name, mapped.message)
                retryable = (
                    err.code() == grpc.StatusCode.UNAVAILABLE
                    and not received
                    and attempt + 1 < len(order)
                    and mapped.stage == self.stage
                )
                if retryable:
                    log.warning("stage=%s replica=%s unavailable; trying the next replica", self.stage, addr)
                    continue
                try:
                    raise mapped from None
                finally:
                    del mapped  # the error's traceback holds this frame: no cycle through a local
            finally:
                if not finished:
                    # Our caller went away (cancel, deadline) or stopped reading early (stop sequence).
                    mark_span(span, "CANCELLED", "caller stopped reading", event="cancelled")
                call.cancel()
                span.end()

    async def close(self) -> None:
        for method in self._methods.values():
            if isinstance(method, LinkClient):
                await method.close()
        for channel in self._channels.values():
            await channel.close()
