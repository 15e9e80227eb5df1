"""Query embeddings of concurrent requests go together; alone, a query waits for nothing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from orchestrator.retrieval.batching import EmbeddingBatcher


class Gated:
    """An embedder that holds each batch until released, recording what it was given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = False

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("model failed")
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)


async def test_queries_arriving_during_a_batch_go_together_in_the_next() -> None:
    model = Gated()
    batcher = EmbeddingBatcher(model, max_batch=3)
    first = asyncio.create_task(batcher.embed("a"))
    assert await asyncio.to_thread(model.started.wait, 10)  # the first query's batch is running, alone
    rest = [asyncio.create_task(batcher.embed("x" * n)) for n in range(2, 7)]
    await asyncio.sleep(0.01)
    model.release.set()
    assert (await first)[0] == 1.0
    assert [float((await r)[0]) for r in rest] == [2.0, 3.0, 4.0, 5.0, 6.0]  # each caller gets its own row
    assert model.calls == [["a"], ["xx", "xxx", "xxxx"], ["xxxxx", "xxxxxx"]]


async def test_a_cancelled_caller_is_left_out_and_a_failure_reaches_every_caller_of_its_batch() -> None:
    model = Gated()
    batcher = EmbeddingBatcher(model)
    first = asyncio.create_task(batcher.embed("a"))
    assert await asyncio.to_thread(model.started.wait, 10)
    gone, kept = asyncio.create_task(batcher.embed("gone")), asyncio.create_task(batcher.embed("kept"))
    await asyncio.sleep(0.01)
    gone.cancel()
    model.fail = True
    model.release.set()
    for call in (first, kept):
        with pytest.raises(RuntimeError, match="model failed"):
            await call
    assert model.calls == [["a"], ["kept"]]
    model.fail = False  # the batcher recovers: the next query runs at once
    assert float((await batcher.embed("four"))[0]) == 4.0
