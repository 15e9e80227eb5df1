"""A real OTLP/gRPC trace receiver for tests (opentelemetry-proto's TraceService on a loopback port)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        return self

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def snapshot(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)
