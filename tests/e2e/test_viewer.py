"""The trace viewer of ``make traces`` (Arize Phoenix, from its own virtualenv), for real: requests that end ok, shed
and cancelled are read back through its REST API as one trace each, five stage spans with their edges, the GenAI
attributes on the inference span, and no prompt text."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator.launcher import Mesh
from orchestrator_client import OrchestratorRpcError
from tests.conftest import ROOT, mesh_client, poll, stop_process

pytestmark = pytest.mark.mesh

PHOENIX = ROOT / ".venv-phoenix" / "bin" / "phoenix"
SECRET = "violet-walrus-5521"  # appears only in prompt text
STAGE_KINDS = {"stream": "CHAIN", "post": "CHAIN", "inference": "LLM", "assemble": "CHAIN", "rag": "RETRIEVER"}


def _script() -> Any:
    """The script ``make traces`` runs: the tests start the viewer as it does."""
    spec = importlib.util.spec_from_file_location("traces", ROOT / "deploy" / "phoenix" / "traces.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


traces = _script()


@pytest.fixture(scope="module")
def viewer() -> Iterator[tuple[int, int]]:
    """Phoenix on free ports (HTTP, OTLP/gRPC): a port taken meanwhile makes it exit, and another pair is tried."""
    if not PHOENIX.exists():
        pytest.fail("the trace viewer is missing: run 'make phoenix-deps' (make test does)")
    for _ in range(5):
        port, grpc_port = random.sample(range(20000, 60000), 2)
        proc = traces.start_viewer(port, grpc_port, Path(tempfile.mkdtemp(prefix="phoenix-test-")))
        try:
            traces.wait_ready(port, proc)
        except SystemExit:
            stop_process(proc)
            continue
        try:
            yield port, grpc_port
        finally:
            stop_process(proc)
        return
    pytest.fail("the trace viewer did not start")


def spans(port: int, trace_id: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/v1/projects/default/spans?trace_id={trace_id}&limit=100"
    with urllib.request.urlopen(url, timeout=10) as reply:
        data: list[dict[str, Any]] = json.loads(reply.read())["data"]
    return data


def edge_outcomes(port: int) -> set[str]:
    """How the requests the viewer has ended at the edge."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/projects/default/spans?limit=500", timeout=10) as reply:
        data = json.loads(reply.read())["data"]
    return {
        s["attributes"].get("orchestrator.outcome")
        for s in data
        if s["attributes"].get("orchestrator.stage") == "stream"
    }


async def test_the_viewer_shows_each_request_as_one_trace_of_five_stages(
    viewer: tuple[int, int], fresh_mesh: Callable[..., Mesh]
) -> None:
    port, grpc_port = viewer
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    m = fresh_mesh(
        ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="10",
        ORCH_INFERENCE_QUEUE_CAPACITY="0",
        ORCH_INFERENCE_CONCURRENCY="1",
        **otel,
    )
    async with mesh_client(m.entry) as client:
        ok = await client.complete(f"What is a trace? {SECRET}", session="viewer", max_tokens=6)
        holder = client.submit("hold the one slot " * 20, session="holder", max_tokens=100, timeout=30)
        await anext(holder)  # inference's only slot is taken, its queue holds none: the next is shed there
        with pytest.raises(OrchestratorRpcError) as shed:
            await client.complete("shed me", session="shed", max_tokens=2)
        await holder.aclose()  # cancelled
    assert shed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

    def whole(trace_id: str) -> list[dict[str, Any]] | None:
        found = spans(port, trace_id)
        return found if len(found) >= 9 else None  # five stages, four calls between them

    found = await asyncio.to_thread(poll, lambda: whole(ok.trace_id), 30, 0.5, "the ok request's trace")
    by_id = {s["context"]["span_id"]: s for s in found}
    servers = {s["attributes"].get("orchestrator.stage"): s for s in found if "orchestrator.stage" in s["attributes"]}
    assert set(servers) == set(STAGE_KINDS)
    assert {stage: s["span_kind"] for stage, s in servers.items()} == STAGE_KINDS
    for caller, callee in (("stream", "post"), ("post", "inference"), ("inference", "assemble"), ("assemble", "rag")):
        client_span = by_id[servers[callee]["parent_id"]]  # the caller's CLIENT span, child of its SERVER span
        assert client_span["parent_id"] == servers[caller]["context"]["span_id"], (caller, callee)
    genai = servers["inference"]["attributes"]
    assert genai["gen_ai.request.model"] == "echo" and genai["gen_ai.usage.output_tokens"] == 6
    assert genai["llm.token_count.completion"] == 6
    everything = json.dumps(found)
    assert SECRET not in everything
    # The shed and the cancelled requests are traces too, marked as they ended.
    await asyncio.to_thread(poll, lambda: {"ok", "shed_below", "cancelled"} <= edge_outcomes(port), 30, 0.5)
