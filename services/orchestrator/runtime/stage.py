"""StageRuntime: admission, validation, spans, outcome counting and error mapping around a stage's logic."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span

from orchestrator.core.calls import TENANT, TENANT_KEY, CallContext
from orchestrator.core.config import LimitsConfig, MeshConfig
from orchestrator.core.errors import ChannelClosed, OrchestratorError, WireStatus, to_status
from orchestrator.core.graph import EDGE, stage
from orchestrator.core.requests import Undecodable, normalize_request
from orchestrator.core.scope import Scope
from orchestrator.core.telemetry import Telemetry, mark_span
from orchestrator.runtime.admission import Admission, Limiter, Slot
from orchestrator.runtime.deadletters import DeadLetter, new_letter_id
from orchestrator.runtime.dlq import DeadLetters
from orchestrator.runtime.security import PeerCheck
from orchestrator.runtime.tenants import EdgeGate, KeyRing, TenantLimits
from orchestrator.v1 import admin_pb2, types_pb2

log = logging.getLogger(__name__)
# The edge's access log: its own logger, so it can be routed or silenced apart from the rest.
access_log = logging.getLogger("orchestrator.access")

T = TypeVar("T")

DEADLINE_SLACK_S = 0.05
# A shed further down, as an adaptive limit's sample: a wait long enough to shrink the limit by half.
SHED_BELOW_AS_WAIT_S = 1.0
SUMMARY_INTERVAL_S = 1.0
# This process, as GetStatus names it: stages that share a process share it.
PROCESS = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Outcomes:
    ok: int = 0
    invalid: int = 0
    failed: int = 0
    cancelled: int = 0
    denied: int = 0
    rate_limited: int = 0


@dataclass
class _Summary:
    """Events of one kind logged at most once a second, with how many there were since the last line: under
    overload or a flood of bad requests, a line per event costs CPU the admitted requests need."""

    count: int = 0
    since: float = 0.0
    logged_at: float = field(default=-SUMMARY_INTERVAL_S)

    def note(self, now: float) -> tuple[int, float] | None:
        """Count one; ``(count, seconds they span)`` when a line is due."""
        if self.count == 0:
            self.since = now
        self.count += 1
        if now - self.logged_at < SUMMARY_INTERVAL_S:
            return None
        due = (self.count, now - self.since)
        self.count, self.logged_at = 0, now
        return due


def _genai_usage(scope: Scope) -> dict[str, str | int]:
    """What GenAI-aware trace viewers read of a generation: the model and token counts, in the OpenTelemetry GenAI
    conventions and OpenInference's (``llm.*``), beside this project's own ``orchestrator.*``."""
    return {
        "orchestrator.model": scope.model,
        "gen_ai.request.model": scope.model,
        "gen_ai.response.model": scope.model,
        "gen_ai.usage.input_tokens": scope.tokens_in,
        "gen_ai.usage.output_tokens": scope.tokens_out,
        "llm.model_name": scope.model,
        "llm.token_count.prompt": scope.tokens_in,
        "llm.token_count.completion": scope.tokens_out,
        "llm.token_count.total": scope.tokens_in + scope.tokens_out,
    }


def _tenant_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The tenant the calling stage sent on (see ``TENANT_KEY``)."""
    for name, value in metadata or ():
        if name == TENANT_KEY and isinstance(value, str):
            return value
    return ""


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
        rpc: str = "",
        record_input: bool = False,
        max_queue_wait_s: float = math.inf,
        adaptive: bool = False,
        peers: PeerCheck | None = None,
        gate: EdgeGate | None = None,
        keys: KeyRing | None = None,
        dead_letters: DeadLetters | None = None,
        access_log: str = "off",
    ) -> None:
        self.stage = stage
        self.rpc = rpc or stage
        # Put the request's input on the span (user data: only the edge, only when configured).
        self.record_input = record_input
        self.limits = limits
        self.telemetry = telemetry or Telemetry()
        limiter = Limiter(concurrency) if adaptive else None
        self.admission = Admission(
            stage, capacity, concurrency, self.telemetry, max_queue_wait_s=max_queue_wait_s, limiter=limiter
        )
        # Under mutual TLS: only the stage that calls this one in the graph may.
        self.peers = peers if peers is not None and peers.active else None
        # At the edge: API keys and each tenant's share. Below it, the tenant comes with the call.
        self.gate = gate
        # The API keys this process knows (None: no keys file), for the edge and the admin service.
        self.keys = keys
        # Where this replica listens, once it does: reported in each request's timings.
        self.replica = ""
        # At the edge: where requests that fail after admission are kept (None: dead letters off).
        self.dead_letters = dead_letters
        # At the edge: a line per request ("text", "json"; "off" elsewhere).
        self.access_log = access_log
        self.outcomes = Outcomes()
        self.draining = False
        self._summaries = {k: _Summary() for k in ("shed", "invalid", "denied", "rate_limited")}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self.telemetry.init_stage(stage, capacity, concurrency)
        self.telemetry.watch_stage(stage, lambda: self.admission.waiting, lambda: self._in_flight)

    @classmethod
    def for_stage(
        cls,
        stage: str,
        cfg: MeshConfig,
        telemetry: Telemetry,
        rpc: str = "",
        *,
        record_input: bool = False,
        keys: KeyRing | None = None,
    ) -> StageRuntime:
        """The runtime of ``stage`` with its queue capacity and concurrency from ``cfg``; the edge checks ``keys``
        and the tenants' limits."""
        own = cfg.stage(stage)
        gate = EdgeGate(stage, keys, TenantLimits(cfg.tenants)) if stage == EDGE else None
        return cls(
            stage,
            capacity=own.queue_capacity,
            concurrency=own.concurrency,
            limits=cfg.limits,
            telemetry=telemetry,
            rpc=rpc,
            record_input=record_input,
            max_queue_wait_s=own.max_queue_wait_ms / 1000,
            adaptive=own.adaptive_limit,
            peers=PeerCheck(cfg.tls, stage),
            gate=gate,
            keys=keys,
            dead_letters=DeadLetters(cfg.dlq, stage, telemetry) if stage == EDGE and cfg.dlq.store != "off" else None,
            access_log=cfg.server.access_log if stage == EDGE else "off",
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
        request: types_pb2.PromptRequest | Undecodable,
        context: CallContext,
        body: Callable[[Scope], AsyncIterator[T]],
    ) -> AsyncIterator[T]:
        """Run one request through the stage: validate, admit (or shed), run ``body``, map errors.

        Every failure is turned into a status here, in one place, before or after the
        first message; a shed always happens before any message.
        """
        started = time.perf_counter()
        span, token = self._open_span(context)
        scope: Scope | None = None
        slot: Slot | None = None
        outcome = "error"
        request_id = ""
        entered: str | None = None  # the tenant whose share this call holds at the edge
        # What ended the request (stage, status, message): not the error itself, whose traceback holds this frame.
        failure: tuple[str, str, str] | None = None
        self._track(+1)
        try:
            deadline_s = context.time_remaining()
            request, entered = self._accept(request, context, span, deadline_s)
            request_id = request.request_id
            slot = await self.admission.acquire(deadline_s)
            scope = self._scope(request, slot, span)
            async for message in body(scope):
                yield message
            outcome = "ok"
            self.outcomes.ok += 1
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled, or closed by gRPC between messages: either way the caller went away.
            outcome = self._cancelled(request_id, context, span)
            raise
        except OrchestratorError as err:
            failure = (err.stage or self.stage, err.code.name, err.message)
            outcome = self._failed(request_id, context, span, err)
        except Exception as exc:
            outcome = self._crashed(request_id, context, span, exc)
        finally:
            if slot is not None:
                slot.release(self._queued_below(scope, outcome))
            if entered is not None and self.gate is not None:
                self.gate.leave(entered)
            self._track(-1)
            self.telemetry.record_stage_latency(self.stage, time.perf_counter() - started, outcome)
            if self.keys is not None and self.gate is not None and (tenant := TENANT.get()):
                self.telemetry.record_tenant(tenant, outcome)
            if self.dead_letters is not None and scope is not None and isinstance(request, types_pb2.PromptRequest):
                self._dead_letter(request, outcome, failure, scope, span, started)
            if self.access_log != "off":
                self._access(request, outcome, failure, scope, started)
            self._close_span(span, token, outcome, scope)

    def _access(
        self,
        request: types_pb2.PromptRequest | Undecodable,
        outcome: str,
        failure: tuple[str, str, str] | None,
        scope: Scope | None,
        started: float,
    ) -> None:
        """The edge's line per request: ids, how it ended and where, sizes and timings; never text."""
        known = request if isinstance(request, types_pb2.PromptRequest) else None
        fields = {
            "request": known.request_id if known else "",
            "session": known.session.id if known else "",
            "tenant": TENANT.get(),
            "outcome": outcome,
            "stage": failure[0] if failure else self.stage,
            "status": failure[1] if failure else ("OK" if outcome == "ok" else outcome.upper()),
            "input_chars": len(known.input) if known else 0,
            "tokens": scope.tokens_out if scope is not None else 0,
            "queue_ms": round(scope.queue_s * 1000, 2) if scope is not None else 0.0,
            "total_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if self.access_log == "json":
            access_log.info(json.dumps(fields, separators=(",", ":")))
        else:
            access_log.info(" ".join(f"{k}={v if v != '' else '-'}" for k, v in fields.items()))

    def _dead_letter(
        self,
        request: types_pb2.PromptRequest,
        outcome: str,
        failure: tuple[str, str, str] | None,
        scope: Scope,
        span: Span,
        started: float,
    ) -> None:
        """Keep a request that failed after admission (an error or a deadline; a shed below too, if configured)."""
        assert self.dead_letters is not None
        if outcome not in ("error", "deadline") and not (outcome == "shed_below" and self.dead_letters.cfg.sheds):
            return
        if failure is not None:
            stage, status, message = failure
        else:  # the caller's deadline passed here, or a bug in this stage
            status = "DEADLINE_EXCEEDED" if outcome == "deadline" else "INTERNAL"
            stage, message = self.stage, "deadline exceeded" if outcome == "deadline" else "internal error"
        ctx = span.get_span_context()
        self.dead_letters.record(
            DeadLetter(
                id=new_letter_id(),
                request_id=request.request_id,
                session=request.session.id,
                stage=stage,
                status=status,
                message=message,
                at=time.time(),
                duration_ms=(time.perf_counter() - started) * 1000,
                tokens_streamed=scope.tokens_out,
                tenant=TENANT.get(),
                trace_id=format(ctx.trace_id, "032x") if ctx.is_valid else "",
                span_id=format(ctx.span_id, "016x") if ctx.is_valid else "",
                request=request.SerializeToString() if self.dead_letters.cfg.keep_request else None,
            )
        )

    @staticmethod
    def _queued_below(scope: Scope | None, outcome: str) -> float | None:
        """What the request says of congestion below this stage (an adaptive limit's sample): how long it waited
        in the queues there, or, shed there, as long as any request may wait."""
        if outcome == "shed_below":
            return SHED_BELOW_AS_WAIT_S
        return scope.queued_below_s if scope is not None else None

    # -- spans -------------------------------------------------------------------------------------

    def _open_span(self, context: CallContext) -> tuple[Span, object]:
        """The stage's SERVER span, made current for this RPC's task so downstream calls become its children. An
        unsampled one is made current too: its context carries the decision on, so no stage below starts a trace of
        its own in the middle of the chain."""
        span = self.telemetry.server_span(self.rpc, context.invocation_metadata())
        token = otel_context.attach(trace.set_span_in_context(span)) if self.telemetry.tracing else None
        return span, token

    def _describe(self, span: Span, request: types_pb2.PromptRequest) -> None:
        kind = stage(self.stage).span_kind
        if kind == "LLM":  # the GenAI request, as the OpenTelemetry GenAI conventions name it
            span.set_attributes(
                {
                    "gen_ai.operation.name": "text_completion",
                    "gen_ai.request.max_tokens": request.params.max_tokens,
                    "gen_ai.request.temperature": request.params.temperature,
                }
            )
        span.set_attributes(
            {
                "openinference.span.kind": kind,
                "orchestrator.stage": self.stage,
                "orchestrator.request_id": request.request_id,
                "orchestrator.session_id": request.session.id,
                "orchestrator.input_chars": len(request.input),
                "orchestrator.queue.depth": self.admission.waiting,
                "orchestrator.queue.capacity": self.admission.capacity,
            }
        )
        if self.record_input:
            span.set_attribute("orchestrator.input", request.input)

    @staticmethod
    def _close_span(span: Span, token: object, outcome: str, scope: Scope | None) -> None:
        if span.is_recording():
            span.set_attribute("orchestrator.outcome", outcome)
            if scope is not None:
                span.set_attributes(
                    {"orchestrator.tokens.in": scope.tokens_in, "orchestrator.tokens.out": scope.tokens_out}
                )
                if scope.model:  # a stage that reports a model is a GenAI operation
                    span.set_attributes(_genai_usage(scope))
        span.end()
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    # -- admission and accounting ------------------------------------------------------------------

    def _accept(
        self,
        request: types_pb2.PromptRequest | Undecodable,
        context: CallContext,
        span: Span,
        deadline_s: float | None,
    ) -> tuple[types_pb2.PromptRequest, str | None]:
        """Refuse a request this stage must not take, before any work: draining, from a caller it does not
        serve, over its tenant's share, overloaded, or invalid. A shed is decided before the request is read:
        under overload it is the common answer, and the cheapest one. Returns the request, and the tenant whose
        share it now holds (None: none held)."""
        if self.draining:
            # UNAVAILABLE before any message: the caller may retry on another replica.
            raise ChannelClosed(f"{self.stage} stage is shutting down", stage=self.stage)
        if self.peers is not None:
            self.peers.check(context.auth_context())
        held = None
        if self.gate is not None:
            tenant, holds = self.gate.enter(context.invocation_metadata())
            held = tenant if holds else None
        else:
            tenant = _tenant_of(context.invocation_metadata())
        TENANT.set(tenant)
        try:
            self.admission.check(deadline_s)
            if not (getattr(context, "validated", False) and isinstance(request, types_pb2.PromptRequest)):
                request = normalize_request(request, self.limits)
        except BaseException:
            if held is not None and self.gate is not None:
                self.gate.leave(held)
            raise
        if span.is_recording():
            self._describe(span, request)
            if tenant:
                span.set_attribute("orchestrator.tenant", tenant)
        return request, held

    def _scope(self, request: types_pb2.PromptRequest, slot: Slot, span: Span) -> Scope:
        self.telemetry.record_queue_wait(self.stage, slot.queue_s)
        span.set_attribute("orchestrator.queue.wait_ms", slot.queue_s * 1000)
        return Scope(
            self.stage,
            request.request_id,
            slot.queue_s,
            slot.admitted_at,
            span=span,
            telemetry=self.telemetry,
            replica=self.replica,
        )

    def _track(self, delta: int) -> None:
        """Count a request in (+1) or out (-1) of the stage; draining waits for zero."""
        self._in_flight += delta
        if self._in_flight == 0:
            self._idle.set()

    # -- how a request ended -----------------------------------------------------------------------

    def _cancelled(self, request_id: str, context: CallContext, span: Span) -> str:
        outcome = self._cancel_outcome(context)
        self.outcomes.cancelled += 1
        code = "DEADLINE_EXCEEDED" if outcome == "deadline" else "CANCELLED"
        mark_span(span, code, "the caller went away", event=outcome)
        log.info("stage=%s request=%s %s", self.stage, request_id or "-", outcome)
        return outcome

    def _failed(self, request_id: str, context: CallContext, span: Span, err: OrchestratorError) -> str:
        """The one place an error becomes this call's status."""
        err.stage = err.stage or self.stage
        outcome = self._error_outcome(err)
        event = {"shed": "shed", "deadline": "deadline"}.get(outcome)
        mark_span(span, err.code.name, err.message, event=event, **{"orchestrator.failed_stage": err.stage})
        span.set_attribute("orchestrator.failed_stage", err.stage)
        self._log_error(request_id, err, outcome)
        to_status(err).set_on(context)
        return outcome

    def _crashed(self, request_id: str, context: CallContext, span: Span, exc: Exception) -> str:
        """A bug: logged with its traceback, never sent; the caller gets a safe INTERNAL."""
        self.outcomes.failed += 1
        mark_span(span, "INTERNAL", type(exc).__name__)
        log.error("stage=%s request=%s failed", self.stage, request_id or "-", exc_info=exc)
        WireStatus(grpc.StatusCode.INTERNAL, f"internal error in the {self.stage} stage").set_on(context)
        return "error"

    def _log_error(self, request_id: str, err: OrchestratorError, outcome: str) -> None:
        """The stage where an error started logs it, one line and no traceback; stages it passes through only
        at DEBUG. Sheds and invalid requests are summarised: a line a second at most, with a count."""
        if err.stage != self.stage:
            log.debug("stage=%s request=%s %s from the %s stage", self.stage, request_id, err.code.name, err.stage)
            return
        summary = self._summaries.get(outcome)
        if summary is None:
            log.warning("stage=%s request=%s %s: %s", self.stage, request_id, err.code.name, err.message)
            return
        due = summary.note(time.monotonic())
        if due is not None:
            count, seconds = due
            log.warning(
                "stage=%s %s %d request(s) in %.1f s, the last %s: %s",
                self.stage,
                "shed" if outcome == "shed" else "refused",
                count,
                seconds,
                request_id or "-",
                err.message,
            )

    def _error_outcome(self, err: OrchestratorError) -> str:
        """The outcome an error counts as here. A shed is ``shed`` only at the stage that shed (which also
        counts it in ``shed_total`` and its admin counters); the stages it passes through count ``shed_below``."""
        if err.reason == "OVERLOADED":
            return "shed" if err.stage == self.stage else "shed_below"
        if err.reason in ("CANCELLED", "DEADLINE_EXCEEDED"):
            self.outcomes.cancelled += 1
            return "deadline" if err.reason == "DEADLINE_EXCEEDED" else "cancelled"
        if err.reason in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.outcomes.denied += 1
            return "denied"
        if err.reason == "RATE_LIMITED":
            self.outcomes.rate_limited += 1
            return "rate_limited"
        if err.reason == "INVALID_REQUEST":
            self.outcomes.invalid += 1
            return "invalid"
        self.outcomes.failed += 1
        return "error"

    @staticmethod
    def _cancel_outcome(context: CallContext) -> str:
        # A caller whose own deadline passed cancels us a moment before ours does: a cancel that
        # close to our deadline is the deadline.
        remaining = context.time_remaining()
        return "deadline" if remaining is not None and remaining <= DEADLINE_SLACK_S else "cancelled"

    def status(self) -> admin_pb2.GetStatusResponse:
        adm = self.admission
        return admin_pb2.GetStatusResponse(
            stage=self.stage,
            replica=self.replica,
            process=PROCESS,
            queue=admin_pb2.QueueStatus(
                capacity=adm.capacity,
                concurrency=adm.concurrency,
                waiting=adm.waiting,
                active=adm.active,
                concurrency_max=adm.max_concurrency,
                max_queue_wait_ms=0 if math.isinf(adm.max_queue_wait_s) else round(adm.max_queue_wait_s * 1000),
            ),
            counters=admin_pb2.Counters(
                admitted=adm.stats.admitted,
                shed=adm.stats.shed,
                ok=self.outcomes.ok,
                failed=self.outcomes.failed,
                cancelled=self.outcomes.cancelled,
                invalid=self.outcomes.invalid,
                denied=self.outcomes.denied,
                rate_limited=self.outcomes.rate_limited,
            ),
        )
