"""Query embeddings of concurrent requests, computed together.

Embedding one short query is mostly fixed cost (~280 operator calls in ONNX Runtime whatever the batch), so a batch
of 8 costs ~2.1 ms a query where one alone costs 3.5-5.5 ms. The batcher runs one batch at a time in a worker
thread; queries that arrive meanwhile wait for it and go together in the next. A query that finds no batch running
runs at once, as a batch of one, from its own task: alone, it waits for nothing and costs what it did unbatched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np


class EmbeddingBatcher:
    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], max_batch: int = 32) -> None:
        self._embed, self._max = embed, max(1, max_batch)
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None

    async def embed(self, text: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self._running:  # a batch is running: wait for the next one
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._pending.append((text, future))
            return await future
        # None running: this query is a batch of its own, run from its own task (no hand-off between tasks: alone,
        # a query costs what it did unbatched). Queries arriving meanwhile are run after it by a task of theirs.
        self._running = True
        try:
            vectors: np.ndarray = await asyncio.to_thread(self._embed, [text])
        finally:
            if self._pending:
                self._task = loop.create_task(self._run())  # held: the loop keeps only a weak reference
            else:
                self._running = False
        vector: np.ndarray = vectors[0]
        return vector

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = [(t, f) for t, f in self._pending[: self._max] if not f.done()]  # a cancelled caller: skip
                del self._pending[: self._max]
                if not batch:
                    continue
                try:
                    vectors = await asyncio.to_thread(self._embed, [t for t, _ in batch])
                except Exception as exc:  # every caller of the batch gets the failure
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(exc)
                    continue
                for (_, f), vector in zip(batch, vectors, strict=True):
                    if not f.done():
                        f.set_result(vector)
        finally:
            self._running = False
