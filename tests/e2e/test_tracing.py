"""One OTLP trace per request across the five processes, checked with a real OTLP/gRPC receiver."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from orchestrator.launcher import Mesh
from orchestrator_client import OrchestratorRpcError
from tests.conftest import clean_env, free_port_config, launch, mesh_client, poll, run_demo, stage_status
from tests.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.mesh

SERVER, CLIENT = 2, 3  # OTLP span kinds
ERROR = 2  # OTLP status code
STAGES = ["stream", "post", "inference", "assemble", "rag"]
# caller -> callee: the callee's SERVER span is a child of a CLIENT span of the caller, itself a
# child of the caller's SERVER span (the test client has only its CLIENT span).
EDGES = [
    ("client", "stream"),
    ("stream", "post"),
    ("post", "inference"),
    ("inference", "assemble"),
    ("assemble", "rag"),
]
SECRET = "purple-elephant-7741"  # appears only in the prompt text


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }


@pytest.fixture(scope="module")
def client_tracing(receiver: OtlpReceiver) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": "client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True)))
    yield provider
    provider.shutdown()


@pytest.fixture(scope="module")
def traced_mesh(receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    m = launch(tmp_path_factory.mktemp("traced"), ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="10", **otel_env(receiver))
    yield m
    m.stop()


def wait_for_trace(receiver: OtlpReceiver, trace_id: str, servers: int, clients: int) -> list[ReceivedSpan]:
    def complete() -> list[ReceivedSpan] | None:
        spans = receiver.trace(trace_id)
        kinds = [s.kind for s in spans]
        return spans if kinds.count(SERVER) >= servers and kinds.count(CLIENT) >= clients else None

    return poll(complete, timeout_s=15, interval_s=0.05, what=f"spans of trace {trace_id}")


def server_span(spans: list[ReceivedSpan], service: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.kind == SERVER]
    assert len(found) == 1, f"{service}: {len(found)} server spans"
    return found[0]


async def test_one_request_is_one_trace_with_an_edge_per_hop(
    traced_mesh: Mesh, receiver: OtlpReceiver, client_tracing: TracerProvider
) -> None:
    async with mesh_client(traced_mesh.entry, tracer_provider=client_tracing) as client:
        result = await client.complete(f"What is BM25? {SECRET}", session="tracer", max_tokens=20)
    assert len(result.trace_id) == 32  # the edge tells the client its trace id
    spans = wait_for_trace(receiver, result.trace_id, servers=5, clients=5)
    # One trace for the request: every span of it, the client's included, carries that id.
    assert {
        s.trace_id for s in receiver.snapshot() if s.attributes.get("orchestrator.request_id") == result.request_id
    } == {result.trace_id}
    by_id = {s.span_id: s for s in spans}
    client_root = [s for s in spans if s.service == "client"]
    assert len(client_root) == 1 and client_root[0].parent_span_id == ""
    for caller, callee in EDGES:
        child = server_span(spans, callee)
        via = by_id[child.parent_span_id]
        assert via.kind == CLIENT and via.service == caller, (caller, callee)
        if caller != "client":
            assert by_id[via.parent_span_id] is server_span(spans, caller), (caller, callee)
    for stage in STAGES:
        span = server_span(spans, stage)
        attrs = span.attributes
        assert attrs["orchestrator.stage"] == stage
        assert attrs["orchestrator.request_id"] == result.request_id
        assert attrs["orchestrator.session_id"] == "tracer"
        assert attrs["orchestrator.outcome"] == "ok"
        assert "orchestrator.queue.wait_ms" in attrs and "orchestrator.queue.depth" in attrs
        assert span.status_code != ERROR
    # A request that completed leaves no span looking failed or cancelled, client spans included.
    assert [s.name for s in spans if s.status_code == ERROR] == []
    inference = server_span(spans, "inference")
    assert inference.attributes["orchestrator.model"] == "echo"
    assert inference.attributes["orchestrator.tokens.out"] == 20
    assert inference.attributes["orchestrator.tokens.in"] > 0
    assert "first_token" in inference.event_names
    assert server_span(spans, "post").attributes["orchestrator.tokens.out"] == 20
    # What GenAI-aware viewers read: the OpenTelemetry GenAI conventions, and OpenInference's span kinds.
    genai = inference.attributes
    assert genai["gen_ai.operation.name"] == "text_completion" and genai["gen_ai.request.model"] == "echo"
    assert genai["gen_ai.usage.output_tokens"] == 20 and genai["gen_ai.usage.input_tokens"] > 0
    assert genai["gen_ai.request.max_tokens"] == 20 and genai["llm.token_count.completion"] == 20
    kinds = {stage: server_span(spans, stage).attributes["openinference.span.kind"] for stage in STAGES}
    assert kinds == {"stream": "CHAIN", "post": "CHAIN", "inference": "LLM", "assemble": "CHAIN", "rag": "RETRIEVER"}
    # Prompt text is user data: it must not appear anywhere in any span.
    for span in receiver.snapshot():
        for value in [*span.attributes.values(), *(v for _, a in span.events for v in a.values())]:
            assert SECRET not in str(value), span.name


def spans_of_request(receiver: OtlpReceiver, session: str) -> list[ReceivedSpan]:
    roots = [s for s in receiver.snapshot() if s.attributes.get("orchestrator.session_id") == session]
    return receiver.trace(roots[0].trace_id) if roots else []


async def test_cancelled_and_deadline_requests_are_marked(traced_mesh: Mesh, receiver: OtlpReceiver) -> None:
    async with mesh_client(traced_mesh.entry) as client:
        stream = client.submit("cancel me " * 100, session="trace-cancel", max_tokens=300)
        await anext(stream)
        await stream.aclose()
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("too slow " * 100, session="trace-deadline", max_tokens=300, timeout=0.3)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def marked(session: str, outcome: str) -> list[ReceivedSpan] | None:
        spans = spans_of_request(receiver, session)
        servers = {s.service: s for s in spans if s.kind == SERVER}
        ok = all(
            stage in servers and servers[stage].attributes.get("orchestrator.outcome") == outcome
            for stage in ("stream", "post", "inference")
        )
        return spans if ok else None

    for session, outcome, code in (
        ("trace-cancel", "cancelled", "CANCELLED"),
        ("trace-deadline", "deadline", "DEADLINE_EXCEEDED"),
    ):
        spans = poll(partial(marked, session, outcome), timeout_s=15, interval_s=0.05, what=session)
        for stage in ("stream", "post", "inference"):
            span = server_span(spans, stage)
            assert span.status_code == ERROR and span.status_message.startswith(code), (stage, span.status_message)
            assert outcome in span.event_names, (stage, span.event_names)
        # The calls our stages made downstream are not left looking successful.
        for caller in ("stream", "post"):
            clients = [s for s in spans if s.kind == CLIENT and s.service == caller]
            assert clients and all(s.status_code == ERROR for s in clients), caller


async def test_shed_request_is_marked(fresh_mesh: Callable[..., Mesh], receiver: OtlpReceiver, tmp_path: Path) -> None:
    m = fresh_mesh(
        ORCH_INFERENCE_QUEUE_CAPACITY="0",
        ORCH_INFERENCE_CONCURRENCY="1",
        ORCH_INFERENCE_WORKER_ECHO_GATE_FILE=str(tmp_path / "gate"),
        **otel_env(receiver),
    )
    async with mesh_client(m.entry) as client:
        blocker = client.submit("hold the slot", session="trace-holder", max_tokens=2)
        holder = asyncio.ensure_future(anext(blocker))
        deadline = time.monotonic() + 10
        while True:  # wait until the holder owns the only slot
            if stage_status(m.address("inference")).queue.active == 1:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("shed me", session="trace-shed", max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        (tmp_path / "gate").touch()
        await holder
        await blocker.aclose()

    def shed_spans() -> list[ReceivedSpan] | None:
        spans = spans_of_request(receiver, "trace-shed")
        return spans if len([s for s in spans if s.kind == SERVER]) >= 3 else None

    spans = poll(shed_spans, timeout_s=15, interval_s=0.05, what="spans of the shed request")
    inference = server_span(spans, "inference")
    assert inference.attributes["orchestrator.outcome"] == "shed"
    assert "shed" in inference.event_names
    assert inference.status_code == ERROR and inference.status_message.startswith("RESOURCE_EXHAUSTED")
    for stage in ("post", "stream"):
        span = server_span(spans, stage)
        assert span.status_code == ERROR and span.status_message.startswith("RESOURCE_EXHAUSTED")
        assert span.attributes["orchestrator.failed_stage"] == "inference"
    assert not [s for s in spans if s.service in ("assemble", "rag")]  # shed before any work below


def test_demo_prints_trace_ids_that_reach_the_receiver(receiver: OtlpReceiver, tmp_path: Path) -> None:
    done = run_demo(free_port_config(tmp_path), clean_env(**otel_env(receiver)), timeout_s=120)
    assert done.returncode == 0, done.stdout + done.stderr
    trace_ids = re.findall(r"^  trace ([0-9a-f]{32})$", done.stdout, flags=re.MULTILINE)
    assert len(set(trace_ids)) == 10
    for trace_id in trace_ids:
        spans = wait_for_trace(receiver, trace_id, servers=5, clients=5)
        assert any(s.service == "demo-client" for s in spans)


async def test_metrics_reach_an_otlp_receiver(fresh_mesh: Callable[..., Mesh], receiver: OtlpReceiver) -> None:
    """OTEL_METRICS_EXPORTER=otlp: the stages' metrics go to a real OTLP/gRPC receiver, labelled as in Prometheus."""
    m = fresh_mesh(**otel_env(receiver), OTEL_METRICS_EXPORTER="otlp", OTEL_METRIC_EXPORT_INTERVAL="300")
    async with mesh_client(m.entry) as client:
        for i in range(3):
            await client.complete("count me over OTLP", session=f"otlp-{i}", max_tokens=3)

    def counted() -> bool:
        points = receiver.metric_points("orchestrator_requests_total")
        ok = [
            v for service, attrs, v in points if service == "stream" and attrs == {"stage": "stream", "outcome": "ok"}
        ]
        return bool(ok) and max(ok) >= 3

    poll(counted, timeout_s=20, interval_s=0.1, what="orchestrator_requests_total over OTLP")
    depth = receiver.metric_points("orchestrator_queue_depth")  # a gauge read when exported
    assert any(service == "inference" for service, _, _ in depth)
