"""Calls to the next stage down the chain: replica choice, deadline propagation, explicit cancellation.

How a call reaches a replica (a plain gRPC call, a stage link) is the transport's business
(``runtime/transport.py``); this module sees only the ``Transport`` and ``Call`` protocols.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping
from functools import partial
from typing import Generic, TypeVar

import grpc
from opentelemetry.trace import Span

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.calls import Call, CallContext, Transport
from orchestrator.core.errors import DeadlineExceeded, OrchestratorError, from_rpc_error
from orchestrator.core.telemetry import Telemetry, mark_span
from orchestrator.v1 import types_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")


def _cancel(call: Call, _task: object) -> None:
    call.cancel()


class Downstream(Generic[T]):
    """A server-streaming method of the next stage, reached through one transport per replica.

    The replica is chosen by rendezvous hashing of the session id; a replica that is
    unreachable before it sent anything is skipped for the next. The caller's remaining
    deadline goes with every call, and the call is cancelled explicitly as soon as the
    caller's RPC ends, whatever the reason, rather than at garbage collection. Each call
    gets a CLIENT span whose end and status we set ourselves, so an abandoned stream shows
    as cancelled, not OK.
    """

    def __init__(
        self, stage: str, transports: Mapping[str, Transport], rpc: str = "", telemetry: Telemetry | None = None
    ) -> None:
        if not transports:
            raise ValueError(f"no address configured for the {stage} stage")
        self.stage = stage
        self.rpc = rpc or stage
        self.transports = dict(transports)
        self.addresses = tuple(self.transports)
        self._telemetry = telemetry or Telemetry()
        self._telemetry.init_callee(stage)

    async def stream(
        self, request: types_pb2.PromptRequest, context: CallContext | None = None
    ) -> AsyncGenerator[T, None]:
        order = rendezvous_order(request.session.id, self.addresses)
        for attempt, addr in enumerate(order):
            call, span = self._start(addr, request, context)
            received = finished = False
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    received = True
                    yield message
                finished = True
                if len(order) > 1:
                    self._telemetry.record_affinity(self.stage, attempt == 0)
                return
            except grpc.aio.AioRpcError as err:
                finished = True
                failure = self._failure(err, span, addr, retry=not received and attempt + 1 < len(order))
                if failure is None:
                    continue  # the next replica in this session's order
                try:
                    raise failure from None
                finally:
                    del failure  # the error's traceback holds this frame: no cycle through a local
            finally:
                if not finished:
                    # Our caller went away (cancel, deadline) or stopped reading early (stop sequence).
                    mark_span(span, "CANCELLED", "caller stopped reading", event="cancelled")
                call.cancel()
                span.end()

    def _start(self, addr: str, request: types_pb2.PromptRequest, context: CallContext | None) -> tuple[Call, Span]:
        """Call ``addr`` with the caller's remaining deadline, in a CLIENT span; cancelled when the caller's
        own RPC ends."""
        timeout = context.time_remaining() if context is not None else None
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling the {self.stage} stage", stage=self.stage)
        span, metadata = self._telemetry.client_span(self.rpc)
        span.set_attribute("net.peer.name", addr)
        call = self.transports[addr](request, timeout=timeout, metadata=metadata or None)
        task = asyncio.current_task() if context is not None else None
        if task is not None:
            # Runs when the task serving our own RPC ends (done, cancelled, deadline): stop the work
            # below at once. The task's callback, not the gRPC context's: grpc.aio keeps a context's
            # done callbacks in a reference cycle with the call's state, so every call's objects
            # (this call, its request) would wait for a full garbage collection to be freed.
            task.add_done_callback(partial(_cancel, call))
        return call, span

    def _failure(self, err: grpc.aio.AioRpcError, span: Span, addr: str, *, retry: bool) -> OrchestratorError | None:
        """The error to pass up for a failed call, or None to try the next replica: the callee itself was
        unavailable before it sent anything."""
        mapped = from_rpc_error(err, self.stage)
        mark_span(span, err.code().name, mapped.message)
        if retry and err.code() == grpc.StatusCode.UNAVAILABLE and mapped.stage == self.stage:
            log.warning("stage=%s replica=%s unavailable; trying the next replica", self.stage, addr)
            return None
        return mapped

    async def close(self) -> None:
        for transport in self.transports.values():
            await transport.close()
