"""StageRuntime: admission, validation, outcome counting and error mapping around a stage's logic."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from orchestrator.config import LimitsConfig, MeshConfig
from orchestrator.errors import Cancelled, ChannelClosed, DeadlineExceeded, OrchestratorError, to_status
from orchestrator.pipeline.scope import Scope
from orchestrator.requests import normalize_request
from orchestrator.runtime.admission import Admission
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.v1 import admin_pb2, types_pb2

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Outcomes:
    ok: int = 0
    failed: int = 0
    cancelled: int = 0


class StageRuntime:
    """Everything a stage servicer shares with the other four."""

    def __init__(
        self,
        stage: str,
        *,
        capacity: int,
        concurrency: int,
        limits: LimitsConfig,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.stage = stage
        self.limits = limits
        self.telemetry = telemetry or Telemetry()
        self.admission = Admission(stage, capacity, concurrency, self.telemetry)
        self.outcomes = Outcomes()
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()

    @classmethod
    def for_stage(cls, stage: str, cfg: MeshConfig, telemetry: Telemetry) -> StageRuntime:
        """The runtime of ``stage`` with its queue capacity and concurrency from ``cfg``."""
        own = cfg.stage(stage)
        return cls(
            stage, capacity=own.queue_capacity, concurrency=own.concurrency, limits=cfg.limits, telemetry=telemetry
        )

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new requests and wait up to ``timeout_s`` for in-flight ones; True if all finished."""
        self.draining = True
        if self._in_flight == 0:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def serve(
        self,
        request: types_pb2.PromptRequest,
        context: grpc.aio.ServicerContext,
        body: Callable[[Scope], AsyncIterator[T]],
    ) -> AsyncIterator[T]:
        """Run one request through the stage: validate, admit (or shed), run ``body``, map errors.

        Every failure is turned into a status here, in one place, before or after the
        first message; a shed always happens before any message.
        """
        started = time.perf_counter()
        outcome = "error"
        self._in_flight += 1
        try:
            if self.draining:
                # UNAVAILABLE before any message: the caller may retry on another replica.
                raise ChannelClosed(f"{self.stage} stage is shutting down", stage=self.stage)
            normalize_request(request, self.limits)
            slot = await self.admission.acquire()
            async with slot:
                scope = Scope(self.stage, request.request_id, slot.queue_s, slot.admitted_at)
                async for message in body(scope):
                    yield message
            outcome = "ok"
            self.outcomes.ok += 1
        except asyncio.CancelledError:
            outcome = self._cancel_outcome(context)
            self.outcomes.cancelled += 1
            log.info("stage=%s request=%s %s", self.stage, request.request_id, outcome)
            raise
        except OrchestratorError as err:
            err.stage = err.stage or self.stage
            outcome = "shed" if err.reason == "OVERLOADED" and err.stage == self.stage else "error"
            if isinstance(err, Cancelled | DeadlineExceeded):
                outcome = err.reason.lower()
                self.outcomes.cancelled += 1
            elif outcome == "error":
                self.outcomes.failed += 1
            log.warning(
                "stage=%s request=%s session_chars=%d %s: %s (from %s)",
                self.stage,
                request.request_id,
                len(request.session.id),
                err.code.name,
                err.message,
                err.stage or self.stage,
            )
            status = to_status(err)
            await context.abort(status.code, status.details, status.trailing_metadata)
        except Exception:
            self.outcomes.failed += 1
            log.exception("stage=%s request=%s failed", self.stage, request.request_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in the {self.stage} stage")
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            self.telemetry.record_stage_latency(self.stage, time.perf_counter() - started, outcome)

    @staticmethod
    def _cancel_outcome(context: grpc.aio.ServicerContext) -> str:
        remaining = context.time_remaining()
        return "deadline" if remaining is not None and remaining <= 0 else "cancelled"

    def status(self) -> admin_pb2.GetStatusResponse:
        adm = self.admission
        return admin_pb2.GetStatusResponse(
            stage=self.stage,
            queue=admin_pb2.QueueStatus(
                capacity=adm.capacity, concurrency=adm.concurrency, waiting=adm.waiting, active=adm.active
            ),
            counters=admin_pb2.Counters(
                admitted=adm.stats.admitted,
                shed=adm.stats.shed,
                ok=self.outcomes.ok,
                failed=self.outcomes.failed,
                cancelled=self.outcomes.cancelled,
            ),
        )
