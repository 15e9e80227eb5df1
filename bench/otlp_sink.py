"""A minimal OTLP/gRPC trace receiver that counts spans: the far end of the tracing benchmark."""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._server: Any = None
        self.endpoint = ""

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any) -> Any:
        with self._lock:
            self.count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            self.receive(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        """Keep what a subclass needs of each export (called under the lock); the sink only counts."""

    def start(self) -> OtlpSink:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self._server.stop(0)
