"""End to end through five stage processes on loopback, with real gRPC clients."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from orchestrator.core.config import load_config
from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh
from orchestrator.pipeline.assemble import render_prompt
from orchestrator.pipeline.rag import build_retriever
from orchestrator.stages.local import LocalPipeline
from orchestrator.v1 import admin_pb2, types_pb2
from orchestrator.workers.echo import echo_tokens
from orchestrator_client import AsyncOrchestratorClient, FinishReason, OrchestratorRpcError, build_request
from tests.conftest import mesh_client, poll, scrape, stage_status

pytestmark = pytest.mark.mesh

LONG_INPUT = "tell me about backpressure and bounded queues " * 60  # ~400 echo tokens


def expected_text(user_input: str, max_tokens: int) -> str:
    """What Echo + Post produce for ``user_input`` with the default config, computed independently."""
    cfg = load_config(env={})
    hits = build_retriever(cfg.rag).search(user_input, cfg.rag.top_k)
    docs = [types_pb2.Document(id=h.doc.id, title=h.doc.title, text=h.doc.text, score=h.score) for h in hits]
    prompt, _ = render_prompt(user_input, docs, cfg.assemble.max_prompt_chars)
    return "".join(echo_tokens(prompt)[:max_tokens])


async def test_stream_equals_echo_plus_post(mesh: Mesh) -> None:
    user_input = "How does load shedding protect latency?"
    async with mesh_client(mesh.entry) as client:
        chunks = [c async for c in client.submit(user_input, session="alice", max_tokens=40)]
    text = "".join(c.text for c in chunks)
    assert text == expected_text(user_input, 40)
    assert [c.sequence for c in chunks] == list(range(len(chunks)))
    assert len({c.request_id for c in chunks}) == 1 and chunks[0].request_id
    assert all(not c.HasField("completion") for c in chunks[:-1])
    done = chunks[-1].completion
    assert done.finish_reason == FinishReason.Value("FINISH_REASON_LENGTH")
    assert done.usage.completion_tokens == 40
    assert done.usage.prompt_tokens > 40
    assert done.model == "echo"
    assert [t.stage for t in done.timings] == list(STAGES)
    assert all(t.duration_ms > 0 for t in done.timings)

    # The same stage functions composed in one process give the same text.
    local = LocalPipeline(load_config(env={}))
    local_chunks = [c async for c in local.submit(build_request(user_input, session="alice", max_tokens=40))]
    assert "".join(c.text for c in local_chunks) == text


async def test_stop_sequence_ends_the_stream(mesh: Mesh) -> None:
    user_input = "What is BM25 ranking?"
    full = expected_text(user_input, 200)
    stop = "scores a document"
    assert stop in full
    async with mesh_client(mesh.entry) as client:
        result = await client.complete(user_input, session="bob", max_tokens=200, stop=[stop])
    assert result.text == full[: full.index(stop)]
    assert result.completion.finish_reason == FinishReason.Value("FINISH_REASON_STOP")
    assert 0 < result.completion.usage.completion_tokens < 200


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"input": "", "session": "s"}, "input is empty"),
        ({"input": "hello", "session": ""}, "session.id is required"),
        ({"input": "x" * 16385, "session": "s"}, "input is 16385 characters; the limit is 16384"),
        ({"input": "hello", "session": "s", "max_tokens": 5000}, "params.max_tokens is 5000; the limit is 4096"),
        ({"input": "hello", "session": "s", "temperature": 3.0}, "params.temperature must be within [0, 2]"),
        ({"input": "hello", "session": "s", "stop": [""]}, "params.stop[0] is empty"),
    ],
)
async def test_bad_input_is_invalid_argument(mesh: Mesh, request_kwargs: dict[str, object], message: str) -> None:
    async with mesh_client(mesh.entry) as client:
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete(**request_kwargs)  # type: ignore[arg-type]
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.message
        assert info.value.stage == "stream"
        # ... and the mesh keeps serving.
        ok = await client.complete("still there?", session="s", max_tokens=3)
        assert ok.completion.usage.completion_tokens == 3


async def test_missing_session_message_is_rejected_at_the_edge(mesh: Mesh) -> None:
    request = types_pb2.PromptRequest(input="no session at all")
    async with mesh_client(mesh.entry) as client:
        with pytest.raises(OrchestratorRpcError) as info:
            _ = [c async for c in client.submit_request(request)]
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_surge_admits_capacity_plus_concurrency_and_sheds_the_rest(fresh_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gate = tmp_path / "gate"
    capacity, concurrency, n = 4, 2, 20
    m: Mesh = fresh_mesh(
        ORCH_INFERENCE_QUEUE_CAPACITY=str(capacity),
        ORCH_INFERENCE_CONCURRENCY=str(concurrency),
        ORCH_INFERENCE_WORKER_ECHO_GATE_FILE=str(gate),
        # The test holds requests in the queue on purpose: no bound on how long they may wait there.
        ORCH_INFERENCE_MAX_QUEUE_WAIT_MS="600000",
    )
    outcomes: list[object] = []

    async def one(i: int, client: AsyncOrchestratorClient) -> None:
        try:
            outcomes.append(await client.complete(f"surge request {i}", session=f"s{i}", max_tokens=5, timeout=60))
        except OrchestratorRpcError as err:
            outcomes.append(err)

    async with mesh_client(m.entry) as client:
        tasks = [asyncio.create_task(one(i, client)) for i in range(n)]
        # Sheds come back at once, while the admitted requests wait on the gate.
        deadline = time.monotonic() + 30
        while len(outcomes) < n - capacity - concurrency:
            assert time.monotonic() < deadline, f"only {len(outcomes)} sheds arrived"
            await asyncio.sleep(0.01)
        status = stage_status(m.address("inference"))
        assert (status.queue.active, status.queue.waiting) == (concurrency, capacity)
        assert len(outcomes) == n - capacity - concurrency
        sheds = [o for o in outcomes if isinstance(o, OrchestratorRpcError)]
        assert len(sheds) == n - capacity - concurrency
        for err in sheds:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert err.stage == "inference"
            assert err.metadata["capacity"] == str(capacity)
            assert err.retry_after_s is not None and err.retry_after_s > 0
            assert "inference stage is overloaded" in err.message
        gate.touch()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    completed = [o for o in outcomes if not isinstance(o, OrchestratorRpcError)]
    assert len(completed) == capacity + concurrency
    assert len(completed) + len(sheds) == n

    # The stage counts a request after its last message has gone out: poll, do not race it.
    def counted() -> admin_pb2.GetStatusResponse | None:
        st = stage_status(m.address("inference"))
        return st if st.counters.ok == capacity + concurrency else None

    status = poll(counted, what="the inference stage to count the completions")
    assert status.counters.shed == n - capacity - concurrency


def _idle_everywhere(m: Mesh) -> bool:
    for name in STAGES:
        s = stage_status(m.address(name))
        if s.queue.active or s.queue.waiting:
            return False
    return stage_status(m.address("inference")).worker.active == 0


async def test_cancel_mid_stream_stops_the_worker(slow_mesh: Mesh) -> None:
    async with mesh_client(slow_mesh.entry) as client:
        stream = client.submit(LONG_INPUT, session="canceller", max_tokens=400)
        got = [await anext(stream) for _ in range(3)]
        assert all(c.text for c in got)
        before = stage_status(slow_mesh.address("inference")).worker
        assert before.active == 1
        cancelled_at = time.time_ns()
        await stream.aclose()  # cancels the call

    def stopped_worker() -> admin_pb2.WorkerStatus | None:
        worker = stage_status(slow_mesh.address("inference")).worker
        return worker if worker.active == 0 else None

    worker = poll(stopped_worker, what="the worker to stop")
    stop_ms = (worker.last_generation_end_unix_nanos - cancelled_at) / 1e6
    print(f"\nworker stopped {stop_ms:.2f} ms after the client cancelled")
    assert stop_ms < 500
    poll(lambda: _idle_everywhere(slow_mesh), what="every stage to release the request")
    tokens = worker.tokens_generated
    await asyncio.sleep(0.1)
    assert stage_status(slow_mesh.address("inference")).worker.tokens_generated == tokens
    assert tokens < 100  # far fewer than the 400 asked for
    for name in ("inference", "post", "stream"):  # rag and assemble had finished their part
        assert stage_status(slow_mesh.address(name)).counters.cancelled >= 1, name


async def test_deadline_shorter_than_the_work(slow_mesh: Mesh) -> None:
    async with mesh_client(slow_mesh.entry) as client:
        started = time.monotonic()
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete(LONG_INPUT, session="hurried", max_tokens=400, timeout=0.5)
        elapsed = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert elapsed < 2.0
    poll(lambda: _idle_everywhere(slow_mesh), what="the worker and every stage to stop")


async def test_client_retries_honour_the_shed_retry_hint(fresh_mesh) -> None:  # type: ignore[no-untyped-def]
    m: Mesh = fresh_mesh(
        ORCH_INFERENCE_QUEUE_CAPACITY="0",
        ORCH_INFERENCE_CONCURRENCY="1",
        ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="30",
    )
    async with mesh_client(m.entry) as plain, mesh_client(m.entry, retries=4) as retrying:
        await plain.complete("warm up", session="w", max_tokens=5)  # the stage learns how long a request holds a slot

        async def burst(client: AsyncOrchestratorClient) -> list[object]:
            calls = [client.complete(f"retry {i}", session=f"r{i}", max_tokens=5, timeout=30) for i in range(3)]
            return await asyncio.gather(*calls, return_exceptions=True)

        without = await burst(plain)
        sheds = [r for r in without if isinstance(r, OrchestratorRpcError)]
        assert len(sheds) == 2
        hint = sheds[0].retry_after_s
        assert hint is not None and 0.05 < hint < 1.0  # about one request's slot time (~120 ms)
        with_retries = await burst(retrying)
    assert not [r for r in with_retries if isinstance(r, BaseException)]  # gRPC retried after the pushback
    assert stage_status(m.address("inference")).counters.shed >= 4


async def test_a_burst_over_the_edge_capacity_is_answered_and_counted_in_full(fresh_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """1,500 streams at once against a mesh at its default settings, held at the worker until all have reached the
    edge: every one ends admitted and completed, or shed naming the stage that shed it, and the edge counts every
    one. (gRPC's own backlog of calls not yet picked up would otherwise cancel some of a burst
    this size, unanswered and uncounted.)"""
    n = 1500
    gate = tmp_path / "gate"
    # Held at the worker until every call has reached the edge (the mesh's other settings are its defaults).
    m: Mesh = fresh_mesh(ORCH_INFERENCE_WORKER_ECHO_GATE_FILE=str(gate))
    outcomes: list[str] = []

    async def one(i: int, client: AsyncOrchestratorClient) -> None:
        try:
            await client.complete(f"burst {i}", session=f"b{i}", max_tokens=2, timeout=120)
            outcomes.append("ok")
        except OrchestratorRpcError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            assert err.stage in STAGES, err
            outcomes.append("shed")

    def arrived() -> bool:
        """Every call reached the edge: it is in the edge now, or the edge has answered it."""
        samples = scrape(m.stages["stream"].metrics_address)
        answered = sum(v for (name, _), v in samples.items() if name == "orchestrator_requests_total")
        return answered + samples[("orchestrator_in_flight_requests", (("stage", "stream"),))] == n

    async with mesh_client(m.entry) as client:
        calls = asyncio.gather(*(one(i, client) for i in range(n)))
        await asyncio.to_thread(poll, arrived, 60, 0.05, "every call of the burst to reach the edge")
        gate.touch()
        await asyncio.wait_for(calls, timeout=120)
    assert len(outcomes) == n
    assert outcomes.count("shed") > 0  # the burst really was over what the edge holds

    def edge_counted() -> dict[str, float] | None:
        samples = scrape(m.stages["stream"].metrics_address)
        counts = {
            dict(labels)["outcome"]: v for (name, labels), v in samples.items() if name == "orchestrator_requests_total"
        }
        return counts if sum(counts.values()) == n else None

    counts = poll(edge_counted, what="the edge to count every call")
    assert (counts["ok"], counts["shed"] + counts["shed_below"]) == (outcomes.count("ok"), outcomes.count("shed"))


async def test_overload_is_shed_fast_and_what_is_admitted_waits_little(fresh_mesh) -> None:  # type: ignore[no-untyped-def]
    """Open-loop load at several times what the model can serve: every request ends admitted and completed, or
    shed with the stage that shed it, and the edge counts exactly what was sent. Admitted requests waited for
    slots no longer than the bound (1 s by default) in all stages together, and the edge's adaptive limit came
    down from its configured 1,024 to about what the model keeps busy."""
    m: Mesh = fresh_mesh(ORCH_INFERENCE_CONCURRENCY="4", ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="10")
    rate, seconds = 300, 2.5  # ~7x the ~40 requests/s four 8-token generations at 10 ms/token serve
    results: list[tuple[str, float]] = []

    async def one(i: int, client: AsyncOrchestratorClient) -> None:
        try:
            done = await client.complete(f"overload {i}", session=f"o{i}", max_tokens=8, timeout=30)
        except OrchestratorRpcError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.stage in STAGES, err
            results.append(("shed", 0.0))
            return
        results.append(("ok", sum(t.queue_ms for t in done.completion.timings)))

    async with mesh_client(m.entry) as client:
        tasks = []
        started = time.monotonic()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, client)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    sent = len(tasks)
    ok = [q for outcome, q in results if outcome == "ok"]
    assert len(results) == sent and 0 < len(ok) < sent, (sent, len(results), len(ok))  # overloaded, still serving
    assert sorted(ok)[int(len(ok) * 0.99) - 1] <= 1000, sorted(ok)[-10:]  # p99, all stages together: the bound

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape(m.stages["stream"].metrics_address)
        total = sum(v for (name, labels), v in samples.items() if name == "orchestrator_requests_total")
        return samples if total == sent else None

    samples = poll(counted, what="the edge to count every request")
    edge_ok = samples[("orchestrator_requests_total", (("outcome", "ok"), ("stage", "stream")))]
    assert edge_ok == len(ok)
    assert samples[("orchestrator_concurrency_limit", (("stage", "stream"),))] < 1024


async def test_the_edge_logs_a_line_per_request_with_ids_and_timings_and_no_text(
    fresh_mesh: Callable[..., Mesh],
) -> None:
    secret = "tangerine-submarine-0091"
    for fmt in ("text", "json"):
        m = fresh_mesh(ORCH_SERVER_ACCESS_LOG=fmt)
        async with mesh_client(m.entry) as client:
            ok = await client.complete(f"log me {secret}", session="logged", max_tokens=5)
            with pytest.raises(OrchestratorRpcError):
                await client.complete("", session="logged")  # invalid: logged too
        log_path = m.stages["stream"].log_path
        assert log_path is not None

        def lines(path: Path = log_path) -> list[str] | None:
            found = [line for line in path.read_text().splitlines() if "orchestrator.access" in line]
            return found if len(found) >= 2 else None

        access = poll(lines, what="two access log lines")
        assert not any(secret in line for line in access)
        line = next(x for x in access if ok.request_id in x)
        if fmt == "json":
            fields = json.loads(line[line.index("{") :])
            assert (fields["session"], fields["outcome"], fields["status"], fields["tokens"]) == (
                "logged",
                "ok",
                "OK",
                5,
            )
            assert fields["total_ms"] > 0
        else:
            assert "session=logged" in line and "outcome=ok" in line and "tokens=5" in line
        assert any("outcome=invalid" in x or '"outcome":"invalid"' in x for x in access)
    # Each stage process exports its own resource use and what it runs.
    samples = scrape(m.stages["inference"].metrics_address)
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert any(name == "orchestrator_build_info" and value == 1 for (name, _), value in samples.items())
    assert any(name.startswith("python_gc_") for name, _ in samples)
