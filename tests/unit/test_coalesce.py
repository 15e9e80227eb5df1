"""Token coalescing: first token at once, batches of k, a flush after t ms, cancellation reaches the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from orchestrator.pipeline.inference import coalesce


async def tokens(n: int, delay_s: float = 0.0, log: list[str] | None = None) -> AsyncIterator[str]:
    try:
        for i in range(n):
            if delay_s:
                await asyncio.sleep(delay_s)
            yield f"t{i}"
    finally:
        if log is not None:
            log.append("closed")


async def test_fast_tokens_are_batched_to_k_and_last_is_flagged() -> None:
    out = [b async for b in coalesce(tokens(20), 8, 0.005)]
    flat = [t for batch, _ in out for t in batch]
    assert flat == [f"t{i}" for i in range(20)]
    assert [last for _, last in out] == [False] * (len(out) - 1) + [True]


async def test_first_token_is_not_held_back() -> None:
    started = time.perf_counter()
    stream = coalesce(tokens(3, delay_s=0.05), 8, 1.0)
    first, last = await anext(stream)
    assert first == ["t0"] and not last
    assert time.perf_counter() - started < 0.5  # not the 1 s hold
    await stream.aclose()


async def test_slow_tokens_are_flushed_after_the_delay() -> None:
    # 30 ms between tokens, 5 ms hold: every token travels alone.
    out = [b async for b in coalesce(tokens(4, delay_s=0.03), 8, 0.005)]
    assert [batch for batch, _ in out if batch] == [["t0"], ["t1"], ["t2"], ["t3"]]


async def test_k_of_one_sends_every_token_alone() -> None:
    out = [b async for b in coalesce(tokens(3, delay_s=0.001), 1, 0.005)]
    assert [batch for batch, _ in out if batch] == [["t0"], ["t1"], ["t2"]]


async def test_closing_the_stream_closes_the_worker() -> None:
    log: list[str] = []
    stream = coalesce(tokens(1000, delay_s=0.01, log=log), 8, 0.005)
    await anext(stream)
    await stream.aclose()
    assert log == ["closed"]


async def test_worker_error_propagates() -> None:
    async def failing() -> AsyncIterator[str]:
        yield "a"
        raise RuntimeError("boom")

    got = []
    try:
        async for batch, _ in coalesce(failing(), 8, 0.005):
            got.extend(batch)
    except RuntimeError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("the worker's error was swallowed")
