"""Telemetry: spans with W3C context over gRPC metadata, Prometheus metrics, optional OTLP export.

One ``Telemetry`` is built per process (``build_telemetry``) and injected into the runtime;
nothing here is global, so tests hold their own. With no OTLP endpoint configured, spans are
non-recording and cost a few attribute look-ups per request.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from opentelemetry import trace
from opentelemetry.propagate import get_global_textmap
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from orchestrator.core.calls import REPLAY_TRACE_KEY

log = logging.getLogger(__name__)

NAMESPACE = "orchestrator"
# How a request can end at a stage (the ``outcome`` label). ``shed_below``: shed by a stage further down and
# passed through this one (only the stage that shed counts ``shed``). ``denied``: wrong or missing credentials, or
# a caller this stage does not serve; ``rate_limited``: a tenant over its own limits.
OUTCOMES = ("ok", "invalid", "denied", "rate_limited", "shed", "shed_below", "cancelled", "deadline", "error")
# Why a stage shed: its queue was full, the wait a request could expect was over the bound (or its deadline),
# or a waiter waited the longest it may.
SHED_REASONS = ("queue_full", "expected_wait", "queue_wait")
LINK_SIDES = ("caller", "callee")
# Tenants are named by the keys file, which an operator writes; still, a label's values stay bounded.
MAX_TENANT_LABELS = 100
# Latency buckets from 0.5 ms to 60 s: stage hops are sub-millisecond, generations take seconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...]


# The one table of metrics: Prometheus names are ``orchestrator_<name>``; the README's table is made from it.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("queue_depth", "gauge", "Requests waiting in the stage's admission queue.", ("stage",)),
    MetricSpec("queue_capacity", "gauge", "Capacity of the stage's admission queue.", ("stage",)),
    MetricSpec("concurrency_limit", "gauge", "Requests the stage processes at once: the limit in force.", ("stage",)),
    MetricSpec("in_flight_requests", "gauge", "Requests in the stage: waiting or active.", ("stage",)),
    MetricSpec("queue_wait_seconds", "histogram", "Time a request waited for admission.", ("stage",)),
    MetricSpec("stage_latency_seconds", "histogram", "Time a stage held a request, by outcome.", ("stage", "outcome")),
    MetricSpec(
        "requests_total",
        "counter",
        f"Requests by stage and outcome ({', '.join(OUTCOMES)}).",
        ("stage", "outcome"),
    ),
    MetricSpec(
        "tenant_requests_total",
        "counter",
        f"Requests at the edge by tenant (from the API keys; at most {MAX_TENANT_LABELS}, then 'other') and outcome.",
        ("tenant", "outcome"),
    ),
    MetricSpec("shed_total", "counter", "Requests shed, by stage and reason.", ("stage", "reason")),
    MetricSpec(
        "dead_letters_total",
        "counter",
        "Dead letters written: requests that failed after the edge admitted them, by the stage and status that ended "
        "them.",
        ("stage", "status"),
    ),
    MetricSpec(
        "dead_letter_errors_total",
        "counter",
        "Dead letters lost: the queue was full (queue_full) or the store failed (store).",
        ("kind",),
    ),
    MetricSpec("dead_letters_dropped_total", "counter", "Dead letters the store's bounds removed (count, age).", ()),
    MetricSpec("dead_letter_store_size", "gauge", "Dead letters in the store.", ()),
    MetricSpec(
        "build_info", "gauge", "1, labelled with the version of the server and of Python.", ("version", "python")
    ),
    MetricSpec(
        "time_to_first_token_seconds", "histogram", "From admission to the worker's first token.", ("stage", "model")
    ),
    MetricSpec("tokens_total", "counter", "Tokens generated (inference) or streamed to clients (stream).", ("stage",)),
    MetricSpec("worker_retries_total", "counter", "Generations retried before their first token.", ("stage",)),
    MetricSpec("breaker_open", "gauge", "1 while the worker's circuit breaker is open or half-open.", ("stage",)),
    MetricSpec(
        "breaker_transitions_total", "counter", "Circuit breaker state changes, by new state.", ("stage", "state")
    ),
    MetricSpec(
        "link_opens_total", "counter", "Stage links opened to a callee stage (first or reconnect).", ("callee",)
    ),
    MetricSpec("link_losses_total", "counter", "Stage links lost with calls in flight.", ("callee",)),
    MetricSpec("link_frames_total", "counter", "Frames sent on stage links, by side (caller, callee).", ("side",)),
    MetricSpec(
        "link_writes_total",
        "counter",
        "Messages written on stage links, by side; frames per write is the batching.",
        ("side",),
    ),
    MetricSpec(
        "replica_ejections_total",
        "counter",
        "Replicas of a callee stage ejected: they missed a health check or answered NOT_SERVING.",
        ("stage",),
    ),
    MetricSpec("replicas_ejected", "gauge", "Replicas of a callee stage ejected now.", ("stage",)),
    MetricSpec(
        "affinity_total",
        "counter",
        "Downstream calls served by the session's first-choice replica (hit) or a fallback (miss).",
        ("stage", "result"),
    ),
)


def describe_metrics() -> str:
    """A Markdown table of every metric (``orchestrator config --metrics``; the README shows it)."""
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    rows += [f"| `{NAMESPACE}_{m.name}` | {m.kind} | {', '.join(m.labels)} | {m.help} |" for m in METRICS]
    return "\n".join(rows)


_LABELS = {spec.name: spec.labels for spec in METRICS}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prompt-orchestrator")
    except PackageNotFoundError:
        return "unknown"


# Gauges read when scraped (or exported), from what the runtime counts anyway: a stage changes them twice per
# request, and a Prometheus gauge's lock costs more than the counting.
WATCHED = ("queue_depth", "in_flight_requests")


class Metrics:
    """Prometheus instruments on an explicit registry, mirrored to OTLP when a meter is given."""

    def __init__(self, registry: CollectorRegistry | None = None, meter: Any | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._prom: dict[str, Any] = {}
        self._otel: dict[str, Any] = {}
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._watched: dict[tuple[str, tuple[str, ...]], Callable[[], float]] = {}
        for spec in METRICS:
            full = f"{NAMESPACE}_{spec.name}"
            if spec.kind == "counter":
                self._prom[spec.name] = Counter(full, spec.help, spec.labels, registry=self.registry)
            elif spec.kind == "gauge":
                self._prom[spec.name] = Gauge(full, spec.help, spec.labels, registry=self.registry)
            else:
                self._prom[spec.name] = Histogram(
                    full, spec.help, spec.labels, registry=self.registry, buckets=_LATENCY_BUCKETS
                )
            if meter is not None and spec.name in WATCHED:
                meter.create_observable_gauge(
                    full, callbacks=[partial(self._observe, spec.name)], description=spec.help
                )
            elif meter is not None:
                unit = "s" if spec.name.endswith("_seconds") else "1"
                create = {
                    "counter": meter.create_counter,
                    "gauge": meter.create_gauge,
                    "histogram": meter.create_histogram,
                }[spec.kind]
                self._otel[spec.name] = create(full, unit=unit, description=spec.help)
        self._runtime()

    def _runtime(self) -> None:
        """The process's own metrics (CPU, memory, open file descriptors, GC; ``process_*``, ``python_*``) and what
        is running (``build_info``)."""
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.set("build_info", (_version(), platform.python_version()), 1)

    def _child(self, name: str, labels: tuple[str, ...]) -> Any:
        key = (name, labels)
        child = self._children.get(key)
        if child is None:
            metric = self._prom[name]
            child = self._children[key] = metric.labels(*labels) if labels else metric
        return child

    def _otel_attrs(self, name: str, labels: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(_LABELS[name], labels, strict=True))

    def watch(self, name: str, labels: tuple[str, ...], read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` when it is scraped or exported."""
        self._child(name, labels).set_function(read)
        self._watched[(name, labels)] = read

    def _observe(self, name: str, _options: Any) -> Iterator[Any]:
        from opentelemetry.metrics import Observation

        for (watched, labels), read in list(self._watched.items()):
            if watched == name:
                yield Observation(read(), self._otel_attrs(name, labels))

    def touch(self, name: str, labels: tuple[str, ...]) -> None:
        """Create a series without recording anything (a histogram's series shows zero counts)."""
        self._child(name, labels)

    def inc(self, name: str, labels: tuple[str, ...], value: float = 1.0) -> None:
        self._child(name, labels).inc(value)
        if self._otel:
            self._otel[name].add(value, self._otel_attrs(name, labels))

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._child(name, labels).set(value)
        if self._otel:
            self._otel[name].set(value, self._otel_attrs(name, labels))

    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None:
        self._child(name, labels).observe(value)
        if self._otel:
            self._otel[name].record(value, self._otel_attrs(name, labels))


def _replay_link(value: str) -> list[trace.Link]:
    """A replayed dead letter's span links to the request it replays (``<trace id>-<span id>``, hex)."""
    trace_id, _, span_id = value.partition("-")
    try:
        context = trace.SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True)
    except ValueError:
        return []
    return [trace.Link(context, {"orchestrator.link": "replay of"})] if context.is_valid else []


class Telemetry:
    """Where the runtime reports what happens to requests; the defaults record metrics only."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: Metrics | None = None,
        *,
        shutdown_hooks: Sequence[Any] = (),
    ) -> None:
        self.tracing = tracer_provider is not None
        self.tracer_provider = tracer_provider
        self.tracer = (tracer_provider or trace.NoOpTracerProvider()).get_tracer("prompt-orchestrator")
        self.metrics = metrics or Metrics()
        self._propagator = get_global_textmap()
        self._shutdown_hooks = list(shutdown_hooks)
        self._tenants: set[str] = set()

    # -- spans ---------------------------------------------------------------------------------

    def server_span(self, rpc: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Span:
        """A SERVER span for an incoming call, child of the caller's ``traceparent`` if any."""
        if not self.tracing:
            return trace.INVALID_SPAN
        carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
        parent = self._propagator.extract(carrier)
        service, _, method = rpc.rpartition("/")
        return self.tracer.start_span(
            rpc,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            links=_replay_link(carrier.get(REPLAY_TRACE_KEY, "")),
        )

    def client_span(self, rpc: str) -> tuple[Span, tuple[tuple[str, str], ...]]:
        """A CLIENT span for an outgoing call, child of the current span, and the metadata carrying it. Under an
        unsampled span there is no span to make: the metadata carries the unsampled context on, which is cheap."""
        if not self.tracing:
            return trace.INVALID_SPAN, ()
        if not trace.get_current_span().get_span_context().trace_flags.sampled:
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            return trace.INVALID_SPAN, tuple(carrier.items())
        service, _, method = rpc.rpartition("/")
        span = self.tracer.start_span(
            rpc,
            kind=SpanKind.CLIENT,
            # A call between stages is a step of the chain to LLM-aware viewers (OpenInference).
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "openinference.span.kind": "CHAIN",
            },
        )
        carrier = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(carrier.items())

    # -- metrics ---------------------------------------------------------------------------------

    def init_stage(self, stage: str, capacity: int, concurrency: int) -> None:
        """A stage's limits, and every series it will count, at zero from the start (so ``increase()`` sees the
        first burst too)."""
        self.metrics.set("queue_capacity", (stage,), capacity)
        self.metrics.set("concurrency_limit", (stage,), concurrency)
        for outcome in OUTCOMES:
            self.metrics.inc("requests_total", (stage, outcome), 0)
            self.metrics.touch("stage_latency_seconds", (stage, outcome))
        for reason in SHED_REASONS:
            self.metrics.inc("shed_total", (stage, reason), 0)
        self.metrics.touch("queue_wait_seconds", (stage,))
        self.metrics.inc("tokens_total", (stage,), 0)
        for side in LINK_SIDES:
            self.metrics.inc("link_frames_total", (side,), 0)
            self.metrics.inc("link_writes_total", (side,), 0)

    def init_callee(self, callee: str) -> None:
        """The series of a stage's calls to its callee, at zero."""
        for result in ("hit", "miss"):
            self.metrics.inc("affinity_total", (callee, result), 0)
        self.metrics.inc("link_opens_total", (callee,), 0)
        self.metrics.inc("link_losses_total", (callee,), 0)
        self.metrics.inc("replica_ejections_total", (callee,), 0)
        self.metrics.set("replicas_ejected", (callee,), 0)

    def init_worker(self, stage: str) -> None:
        """The series of a stage's model worker (retries and its circuit breaker), at zero."""
        self.metrics.inc("worker_retries_total", (stage,), 0)
        self.metrics.set("breaker_open", (stage,), 0)
        for state in ("open", "half_open", "closed"):
            self.metrics.inc("breaker_transitions_total", (stage, state), 0)

    def record_concurrency_limit(self, stage: str, limit: int) -> None:
        """Called when an adaptive limit moves."""
        self.metrics.set("concurrency_limit", (stage,), limit)

    def watch_stage(self, stage: str, queue_depth: Callable[[], int], in_flight: Callable[[], int]) -> None:
        """The stage's queue depth and requests in flight, read when scraped."""
        self.metrics.watch("queue_depth", (stage,), queue_depth)
        self.metrics.watch("in_flight_requests", (stage,), in_flight)

    def record_queue_wait(self, stage: str, seconds: float) -> None:
        self.metrics.observe("queue_wait_seconds", (stage,), seconds)

    def record_stage_latency(self, stage: str, seconds: float, outcome: str) -> None:
        """Called once per request when a stage is done with it."""
        self.metrics.observe("stage_latency_seconds", (stage, outcome), seconds)
        self.metrics.inc("requests_total", (stage, outcome))

    def record_tenant(self, tenant: str, outcome: str) -> None:
        """Called at the edge once per request of a known tenant."""
        seen = self._tenants
        if tenant not in seen:
            if len(seen) >= MAX_TENANT_LABELS:
                tenant = "other"
            else:
                seen.add(tenant)
        self.metrics.inc("tenant_requests_total", (tenant, outcome))

    def record_dead_letter(self, stage: str, status: str) -> None:
        self.metrics.inc("dead_letters_total", (stage, status))

    def record_dead_letter_error(self, kind: str) -> None:
        self.metrics.inc("dead_letter_errors_total", (kind,))

    def record_dead_letters_dropped(self, count: int) -> None:
        if count:
            self.metrics.inc("dead_letters_dropped_total", (), count)

    def record_dead_letter_store_size(self, size: int) -> None:
        self.metrics.set("dead_letter_store_size", (), size)

    def record_shed(self, stage: str, reason: str) -> None:
        """Called for every request a stage sheds."""
        self.metrics.inc("shed_total", (stage, reason))

    def record_first_token(self, stage: str, model: str, seconds: float) -> None:
        self.metrics.observe("time_to_first_token_seconds", (stage, model), seconds)

    def record_tokens(self, stage: str, count: int) -> None:
        self.metrics.inc("tokens_total", (stage,), count)

    def record_affinity(self, stage: str, hit: bool) -> None:
        self.metrics.inc("affinity_total", (stage, "hit" if hit else "miss"))

    def record_ejected(self, callee: str, ejected: int, *, ejection: bool = False) -> None:
        """How many of a callee's replicas are ejected now; ``ejection``: one just was."""
        self.metrics.set("replicas_ejected", (callee,), ejected)
        if ejection:
            self.metrics.inc("replica_ejections_total", (callee,))

    def record_link_open(self, callee: str) -> None:
        self.metrics.inc("link_opens_total", (callee,))

    def record_link_loss(self, callee: str) -> None:
        self.metrics.inc("link_losses_total", (callee,))

    def record_link_write(self, side: str, frames: int) -> None:
        self.metrics.inc("link_writes_total", (side,))
        self.metrics.inc("link_frames_total", (side,), frames)

    def record_retry(self, stage: str) -> None:
        self.metrics.inc("worker_retries_total", (stage,))

    def record_breaker(self, stage: str, state: str) -> None:
        self.metrics.set("breaker_open", (stage,), 0 if state == "closed" else 1)
        self.metrics.inc("breaker_transitions_total", (stage, state))

    def shutdown(self) -> None:
        """Flush and stop exporters (spans still queued are sent)."""
        for hook in self._shutdown_hooks:
            try:
                hook()
            except Exception:  # an exporter that cannot flush must not block shutdown
                log.warning("telemetry shutdown hook failed", exc_info=True)


def mark_span(span: Span, code: str, message: str, event: str | None = None, **attributes: Any) -> None:
    """Record a non-OK outcome on a span: an event (if given) and an ERROR status."""
    if not span.is_recording():
        return
    if event:
        span.add_event(event, attributes)
    span.set_attribute("rpc.grpc.status_code", code)
    span.set_status(Status(StatusCode.ERROR, f"{code}: {message}" if message else code))


def _env_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def build_telemetry(service_name: str, env: Mapping[str, str] | None = None) -> Telemetry:
    """Build the process's telemetry from the standard ``OTEL_*`` variables.

    Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
    (unless ``OTEL_SDK_DISABLED`` or ``OTEL_TRACES_EXPORTER=none``); the sampler comes from
    ``OTEL_TRACES_SAMPLER``/``_ARG``, batching from ``OTEL_BSP_*``. Metrics are also exported over
    OTLP when ``OTEL_METRICS_EXPORTER=otlp``. ``service.name`` is ``OTEL_SERVICE_NAME`` if set, else
    ``service_name`` (the stage).
    """
    env = os.environ if env is None else env
    if _env_true(env.get("OTEL_SDK_DISABLED")):
        return Telemetry()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    traces_on = bool(endpoint) and env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"
    metrics_on = env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "otlp"
    if not traces_on and not metrics_on:
        return Telemetry()

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    attributes = {"service.namespace": "prompt-orchestrator"}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    resource = Resource.create(attributes)
    hooks: list[Any] = []
    provider = None
    if traces_on:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        hooks.append(provider.shutdown)
    meter = None
    if metrics_on:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        meter_provider = MeterProvider(
            resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
        )
        meter = meter_provider.get_meter("prompt-orchestrator")
        hooks.append(meter_provider.shutdown)
    log.info("telemetry: traces %s, OTLP metrics %s", "on" if traces_on else "off", "on" if metrics_on else "off")
    return Telemetry(provider, Metrics(meter=meter), shutdown_hooks=hooks)
