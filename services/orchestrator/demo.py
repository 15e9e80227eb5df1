"""The demo: ten requests from several sessions through a running mesh, answers and a summary printed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

import grpc

from orchestrator_client import AsyncOrchestratorClient, FinishReason, OrchestratorRpcError

DEMO_REQUESTS: tuple[tuple[str, str], ...] = (
    ("alice", "What does backpressure do when a queue is full?"),
    ("bob", "How does rendezvous hashing keep session affinity?"),
    ("carol", "Why stream tokens instead of waiting for the whole answer?"),
    ("alice", "What happens when a gRPC deadline passes?"),
    ("dave", "How does BM25 rank documents?"),
    ("bob", "What should a server do on SIGTERM?"),
    ("carol", "Which status code means a server is out of capacity?"),
    ("dave", "How does continuous batching keep a GPU busy?"),
    ("alice", "Why coalesce tokens into fewer messages?"),
    ("bob", "What is retrieval-augmented generation?"),
)


@dataclass
class DemoResult:
    session: str
    input: str
    text: str = ""
    error: OrchestratorRpcError | None = None
    first_chunk_ms: float = 0.0
    total_ms: float = 0.0
    request_id: str = ""
    trace_id: str = ""
    summary: str = ""
    # The inference replica that answered (its address).
    replica: str = ""


async def _one(client: AsyncOrchestratorClient, session: str, text: str, max_tokens: int) -> DemoResult:
    result = DemoResult(session, text)
    started = time.perf_counter()
    parts: list[str] = []
    try:
        async for chunk in client.submit(text, session=session, max_tokens=max_tokens, timeout=30.0):
            if not parts:
                result.first_chunk_ms = (time.perf_counter() - started) * 1000
            parts.append(chunk.text)
            result.request_id = chunk.request_id
            if chunk.HasField("completion"):
                result.trace_id = chunk.trace_id
                done = chunk.completion
                reason = FinishReason.Name(done.finish_reason).removeprefix("FINISH_REASON_").lower()
                stages = ", ".join(f"{t.stage} {t.duration_ms:.1f}" for t in done.timings)
                result.summary = f"{done.usage.completion_tokens} tokens ({reason}) by {done.model}; stage ms: {stages}"
                result.replica = next((t.replica for t in done.timings if t.stage == "inference"), "")
    except OrchestratorRpcError as err:
        result.error = err
    result.text = "".join(parts)
    result.total_ms = (time.perf_counter() - started) * 1000
    return result


async def run_demo(
    target: str,
    out: TextIO,
    max_tokens: int = 48,
    tracer_provider: Any | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    trace_url: str = "",
) -> Counter[str]:
    """Send the demo requests at once; print each answer as it completes; return outcome counts.

    With a ``tracer_provider`` each request gets a client span and its trace id is printed (as ``trace_url`` with
    ``{trace_id}`` filled in, when given: a trace viewer's link); ``credentials`` connect over TLS.
    """
    counts: Counter[str] = Counter()
    sessions_by_replica: dict[str, set[str]] = {}
    # round_robin: with several edge replicas (an ``ipv4:A,B`` target), the requests are spread over them.
    options = (("grpc.lb_policy_name", "round_robin"),)
    async with AsyncOrchestratorClient(
        target, tracer_provider=tracer_provider, credentials=credentials, options=options
    ) as client:
        tasks = [asyncio.create_task(_one(client, s, t, max_tokens)) for s, t in DEMO_REQUESTS]
        for n, finished in enumerate(asyncio.as_completed(tasks), 1):
            r = await finished
            print(f"\n[{n}/{len(tasks)}] session={r.session} request={r.request_id or '-'}", file=out)
            print(f"  Q: {r.input}", file=out)
            if r.error is None:
                counts["completed"] += 1
                sessions_by_replica.setdefault(r.replica, set()).add(r.session)
                answer = r.text.strip().replace("\n", "\n     ")
                print(f"  A: {answer}", file=out)
                print(f"  first chunk {r.first_chunk_ms:.1f} ms, total {r.total_ms:.1f} ms; {r.summary}", file=out)
                if r.trace_id:
                    shown = trace_url.format(trace_id=r.trace_id) if trace_url else r.trace_id
                    print(f"  trace {shown}", file=out)
            else:
                counts["shed" if r.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED else "failed"] += 1
                print(f"  ! {r.error}", file=out)
    print(
        f"\nsummary: {counts['completed']} completed, {counts['shed']} shed, {counts['failed']} failed "
        f"(of {len(DEMO_REQUESTS)})",
        file=out,
    )
    if len(sessions_by_replica) > 1:  # several inference replicas: where each session went (rendezvous hashing)
        spread = "; ".join(f"{r}: {', '.join(sorted(s))}" for r, s in sorted(sessions_by_replica.items()))
        print(f"inference replicas by session: {spread}", file=out)
    return counts
