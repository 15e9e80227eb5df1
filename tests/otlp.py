"""A real OTLP/gRPC trace receiver for tests (opentelemetry-proto's TraceService on a loopback port)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from bench.otlp_sink import OtlpSink


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    status_message: str
    links: list[tuple[str, str]] = field(default_factory=list)  # (trace id, span id) of each linked span

    @property
    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


class OtlpReceiver(OtlpSink):
    """The project's OTLP sink, keeping every span it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.metrics: dict[str, list[tuple[str, dict[str, Any], float]]] = {}

    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service=str(resource.get("service.name", "")),
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            events=[(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in s.events],
                            status_code=s.status.code,
                            status_message=s.status.message,
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                        )
                    )

    def start(self) -> OtlpReceiver:
        super().start()
        # The same server takes OTLP metrics too (OTEL_METRICS_EXPORTER=otlp): kept by metric name.
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), self._server)
        return self

    def metric_points(self, name: str) -> list[tuple[str, dict[str, Any], float]]:
        """Every data point received for ``name``: (service, attributes, value)."""
        with self._lock:
            return list(self.metrics.get(name, []))

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any) -> Any:
        with self._receiver._lock:
            for rm in request.resource_metrics:
                service = str({a.key: _value(a.value) for a in rm.resource.attributes}.get("service.name", ""))
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        for point in getattr(metric, kind).data_points if kind else ():
                            value = getattr(point, "as_int", 0) or getattr(point, "as_double", 0.0)
                            if kind == "histogram":
                                value = float(point.count)
                            attrs = {a.key: _value(a.value) for a in point.attributes}
                            self._receiver.metrics.setdefault(metric.name, []).append((service, attrs, float(value)))
        return metrics_service_pb2.ExportMetricsServiceResponse()
