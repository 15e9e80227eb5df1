"""Calls to the next stage down the chain: replica choice, deadline propagation, explicit cancellation.

How a call reaches a replica (a plain gRPC call, a stage link) is the transport's business
(``runtime/transport.py``), and which replicas take new calls is ``Replicas``'; this module sees only the
``Transport`` and ``Call`` protocols.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from functools import partial
from typing import Generic, TypeVar

import grpc
from opentelemetry.trace import Span

from orchestrator.core.calls import TENANT, TENANT_KEY, Call, CallContext, Transport
from orchestrator.core.errors import ChannelClosed, DeadlineExceeded, OrchestratorError, from_rpc_error
from orchestrator.core.telemetry import Telemetry, mark_span
from orchestrator.runtime.discovery import Discovery
from orchestrator.runtime.replicas import Replicas, Waiting
from orchestrator.v1 import types_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")


def _cancel(call: Call, _task: object) -> None:
    call.cancel()


class Downstream(Generic[T]):
    """A server-streaming method of the next stage, on its replicas.

    The replica is chosen by rendezvous hashing of the session id over the replicas that answer; a call that
    received nothing from its replica (unreachable, or ejected for not answering) is made again on the next
    one. The caller's remaining deadline goes with every call, and the call is cancelled explicitly as soon as
    the caller's RPC ends, whatever the reason, rather than at garbage collection. Each call gets a CLIENT span
    whose end and status we set ourselves, so an abandoned stream shows as cancelled, not OK.
    """

    def __init__(
        self,
        replicas: Replicas,
        rpc: str = "",
        telemetry: Telemetry | None = None,
        discovery: Discovery | None = None,
    ) -> None:
        if not replicas.addresses and discovery is None:
            raise ValueError(f"no address configured for the {replicas.stage} stage")
        self.replicas = replicas
        self.discovery = discovery
        self.stage = replicas.stage
        self.rpc = rpc or self.stage
        self._telemetry = telemetry or Telemetry()
        self._telemetry.init_callee(self.stage)

    @property
    def transports(self) -> dict[str, Transport]:
        return self.replicas.transports

    async def stream(
        self, request: types_pb2.PromptRequest, context: CallContext | None = None
    ) -> AsyncGenerator[T, None]:
        order = self._order(request.session.id)
        for attempt, addr in enumerate(order):
            call, span = self._start(addr, request, context)
            waiting = self.replicas.waiting(addr, call)
            received = finished = False
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    if not received:
                        received = True
                        self.replicas.received(addr, waiting)
                    yield message
                finished = True
                if len(order) > 1:
                    self._telemetry.record_affinity(self.stage, attempt == 0)
                return
            except asyncio.CancelledError:
                if not self._moved(waiting, span):
                    raise
                finished = True  # its replica was ejected before it sent anything: the next one
            except grpc.aio.AioRpcError as err:
                finished = True
                if self._moved(waiting, span):
                    continue
                failure = self._failure(err, span, addr, retry=not received and attempt + 1 < len(order))
                if failure is None:
                    continue  # the next replica in this session's order
                try:
                    raise failure from None
                finally:
                    del failure  # the error's traceback holds this frame: no cycle through a local
            finally:
                self.replicas.received(addr, waiting)
                if not finished:
                    # Our caller went away (cancel, deadline) or stopped reading early (stop sequence).
                    mark_span(span, "CANCELLED", "caller stopped reading", event="cancelled")
                call.cancel()
                span.end()
        # Every replica was tried and each was ejected before it answered.
        raise ChannelClosed(f"no replica of the {self.stage} stage answered", stage=self.stage)

    def _order(self, session: str) -> list[str]:
        """The replicas this session tries, in order (looked up first, when they are discovered)."""
        if self.discovery is not None:
            self.discovery.start()
        order = self.replicas.order(session)
        if not order:
            raise ChannelClosed(f"no replica of the {self.stage} stage is known yet", stage=self.stage)
        return order

    def _start(self, addr: str, request: types_pb2.PromptRequest, context: CallContext | None) -> tuple[Call, Span]:
        """Call ``addr`` with the caller's remaining deadline, in a CLIENT span; cancelled when the caller's
        own RPC ends."""
        timeout = context.time_remaining() if context is not None else None
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"deadline exceeded before calling the {self.stage} stage", stage=self.stage)
        span, metadata = self._telemetry.client_span(self.rpc)
        tenant = TENANT.get()
        if tenant:
            metadata = (*metadata, (TENANT_KEY, tenant))
        span.set_attribute("net.peer.name", addr)
        call = self.replicas.start(addr, request, timeout=timeout, metadata=metadata or None)
        task = asyncio.current_task() if context is not None else None
        if task is not None:
            # Runs when the task serving our own RPC ends (done, cancelled, deadline): stop the work
            # below at once. The task's callback, not the gRPC context's: grpc.aio keeps a context's
            # done callbacks in a reference cycle with the call's state, so every call's objects
            # (this call, its request) would wait for a full garbage collection to be freed.
            task.add_done_callback(partial(_cancel, call))
        return call, span

    @staticmethod
    def _moved(waiting: Waiting | None, span: Span) -> bool:
        """Whether the call ended because its replica was ejected (it had received nothing): it is made again on
        the next replica. A cancel of our own task is never that: it passes."""
        task = asyncio.current_task()
        if waiting is None or not waiting.moved or (task is not None and task.cancelling()):
            return False
        mark_span(span, "UNAVAILABLE", "replica ejected before it answered", event="moved")
        return True

    def _failure(self, err: grpc.aio.AioRpcError, span: Span, addr: str, *, retry: bool) -> OrchestratorError | None:
        """The error to pass up for a failed call, or None to try the next replica: the callee itself was
        unavailable before it sent anything."""
        mapped = from_rpc_error(err, self.stage)
        mark_span(span, err.code().name, mapped.message)
        if err.code() == grpc.StatusCode.UNAVAILABLE and self.discovery is not None:
            self.discovery.nudge()  # it may have left: look the replicas up again soon
        if retry and err.code() == grpc.StatusCode.UNAVAILABLE and mapped.stage == self.stage:
            log.warning("stage=%s replica=%s unavailable; trying the next replica", self.stage, addr)
            return None
        return mapped

    async def close(self) -> None:
        if self.discovery is not None:
            await self.discovery.close()
        await self.replicas.close()
