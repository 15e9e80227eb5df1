"""Inference stage logic: run the model worker and coalesce its tokens into messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from orchestrator.core.aio import aclose
from orchestrator.core.errors import InferenceError, OrchestratorError, OtherError
from orchestrator.core.scope import Scope
from orchestrator.v1 import types_pb2
from orchestrator.workers.base import GenerationRequest, ModelWorker
from orchestrator.workers.stats import WorkerStats, monitored

log = logging.getLogger(__name__)


async def coalesce(
    tokens: AsyncIterator[str], max_tokens: int, max_delay_s: float
) -> AsyncGenerator[tuple[list[str], bool], None]:
    """Group tokens into batches of at most ``max_tokens``, each held at most ``max_delay_s``.

    Yields ``(batch, last)``; ``last`` is True exactly once, on the final batch (which
    may be empty). The stream's first token is never held back. A reader task pulls
    from ``tokens`` while the previous batch is being sent, so a slow consumer makes
    batches larger instead of stalling the worker; closing this generator cancels the
    reader and closes ``tokens``.
    """
    loop = asyncio.get_running_loop()
    buf: list[str] = []
    ready = asyncio.Event()
    timer: asyncio.TimerHandle | None = None
    done = False
    first = True

    async def reader() -> None:
        nonlocal timer, done, first
        try:
            async for token in tokens:
                buf.append(token)
                n = len(buf)
                if first or n >= max_tokens or max_delay_s <= 0:
                    first = False
                    ready.set()
                elif n == 1:
                    timer = loop.call_later(max_delay_s, ready.set)
        finally:
            done = True
            ready.set()
            await aclose(tokens)

    task = asyncio.create_task(reader())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if timer is not None:
                timer.cancel()
                timer = None
            batch = buf[:]
            buf.clear()
            if done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
                yield batch, True
                return
            if batch:
                yield batch, False
    finally:
        if timer is not None:
            timer.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])


async def infer(
    request: types_pb2.PromptRequest,
    upstream: AsyncIterator[types_pb2.AssembleOutput],
    worker: ModelWorker,
    stats: WorkerStats,
    coalesce_tokens: int,
    coalesce_ms: float,
    scope: Scope,
) -> AsyncIterator[types_pb2.InferenceOutput]:
    """Generate the completion for the assembled prompt, in coalesced InferenceOutput messages."""
    parts: list[str] = []
    timings: list[types_pb2.StageTiming] = []
    async for assembled in upstream:
        parts.append(assembled.prompt)
        timings.extend(assembled.timings)
    if not parts:
        raise OtherError("assemble stage returned no prompt", stage=scope.stage)
    prompt = "".join(parts)
    params = request.params
    generation = GenerationRequest(
        request_id=request.request_id,
        prompt=prompt,
        max_tokens=params.max_tokens,
        stop=tuple(params.stop),
        temperature=params.temperature,
    )
    prompt_tokens = worker.count_tokens(prompt)
    scope.tokens_in = prompt_tokens
    scope.model = worker.name
    index = 0
    try:
        tokens = monitored(worker.generate(generation), stats)
        async for batch, last in coalesce(tokens, coalesce_tokens, coalesce_ms / 1000):
            out = types_pb2.InferenceOutput(tokens=batch, index=index)
            if index == 0:
                ttft_s = scope.elapsed_s()
                scope.telemetry.record_first_token(scope.stage, worker.name, ttft_s)
                if scope.span.is_recording():
                    scope.span.add_event("first_token", {"orchestrator.ttft_ms": ttft_s * 1000})
                out.start.model = worker.name
                out.start.prompt_tokens = prompt_tokens
                out.start.timings.extend(timings)
                out.start.timings.append(scope.timing())
            index += len(batch)
            scope.tokens_out = index
            scope.telemetry.record_tokens(scope.stage, len(batch))
            if last:
                done = out.completion
                done.finish_reason = (
                    types_pb2.FINISH_REASON_LENGTH if index >= params.max_tokens else types_pb2.FINISH_REASON_END
                )
                done.usage.prompt_tokens = prompt_tokens
                done.usage.completion_tokens = index
                done.model = worker.name
                done.timings.extend(timings)
                done.timings.append(scope.timing())
            yield out
    except OrchestratorError:
        raise
    except Exception as exc:
        log.error("request=%s worker=%s failed: %s", request.request_id, worker.name, type(exc).__name__)
        raise InferenceError(f"model worker {worker.name} failed", stage=scope.stage) from exc
