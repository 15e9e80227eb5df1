"""Live counters of a worker (generations in progress, tokens), for the admin status RPC and tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from orchestrator.core.aio import aclose
from orchestrator.v1 import admin_pb2


@dataclass
class WorkerStats:
    active: int = 0
    tokens_generated: int = 0
    last_generation_end_unix_nanos: int = 0

    def status(self, name: str) -> admin_pb2.WorkerStatus:
        """What ``GetStatus`` reports of the worker called ``name``."""
        return admin_pb2.WorkerStatus(
            name=name,
            active=self.active,
            tokens_generated=self.tokens_generated,
            last_generation_end_unix_nanos=self.last_generation_end_unix_nanos,
        )


async def monitored(tokens: AsyncIterator[str], stats: WorkerStats) -> AsyncIterator[str]:
    """Pass tokens through, counting them and the generations in progress."""
    stats.active += 1
    try:
        async for token in tokens:
            stats.tokens_generated += 1
            yield token
    finally:
        await aclose(tokens)
        stats.active -= 1
        stats.last_generation_end_unix_nanos = time.time_ns()
