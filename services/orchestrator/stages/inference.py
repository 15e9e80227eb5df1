"""Inference stage service: streams coalesced tokens from the configured model worker; hot-swaps it on reload."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from functools import partial

from orchestrator.core.calls import CallContext, channel_options
from orchestrator.core.config import MeshConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.pipeline import inference
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.transport import downstream_of
from orchestrator.stages import app_of, runtime_of
from orchestrator.v1 import stages_pb2_grpc, types_pb2
from orchestrator.workers.base import ModelWorker
from orchestrator.workers.registry import build_worker
from orchestrator.workers.stats import WorkerStats

NAME = "inference"
log = logging.getLogger(__name__)


class InferenceServicer(stages_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        runtime: StageRuntime,
        assemble: Downstream[types_pb2.AssembleOutput],
        worker: ModelWorker,
        stats: WorkerStats,
        coalesce_tokens: int,
        coalesce_ms: float,
    ) -> None:
        self._rt, self._assemble, self._stats = runtime, assemble, stats
        self.worker = worker
        self._coalesce = (coalesce_tokens, coalesce_ms)
        self._users: dict[ModelWorker, int] = {}  # requests in flight per worker
        self._closing: set[asyncio.Task[None]] = set()

    async def Infer(
        self, request: types_pb2.PromptRequest, context: CallContext
    ) -> AsyncIterator[types_pb2.InferenceOutput]:
        worker = self.worker  # a request keeps the worker it arrived with, across a swap
        self._users[worker] = self._users.get(worker, 0) + 1
        try:
            body = partial(
                inference.infer,
                request,
                self._assemble.stream(request, context),
                worker,
                self._stats,
                *self._coalesce,
            )
            async for out in self._rt.serve(request, context, body):
                yield out
        finally:
            self._users[worker] -= 1
            if self._users[worker] == 0:
                del self._users[worker]
                if worker is not self.worker:  # swapped out while this request ran: it was the last
                    self._close_later(worker)

    def swap(self, worker: ModelWorker) -> None:
        """New requests go to ``worker``; the old one is closed once its last request is done."""
        old, self.worker = self.worker, worker
        log.info(
            "worker swapped: %s -> %s (%d requests still on the old one)",
            old.name,
            worker.name,
            self._users.get(old, 0),
        )
        if not self._users.get(old):
            self._close_later(old)  # otherwise its last request closes it

    def _close_later(self, worker: ModelWorker) -> None:
        task = asyncio.get_running_loop().create_task(worker.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self.worker.close()
        if self._closing:
            await asyncio.wait(self._closing)


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.inference
    stats = WorkerStats()
    # The worker's concurrency limit is the stage's: a slot is a generation.
    runtime = runtime_of(NAME, cfg, telemetry)
    assemble = downstream_of(NAME, cfg, telemetry)
    app: StageApp

    def new_worker(config: MeshConfig) -> ModelWorker:
        # While the circuit breaker is open the stage reports NOT_SERVING.
        return build_worker(
            config.inference.worker,
            telemetry,
            on_breaker_change=lambda is_open: app.set_ready(not is_open),
            stage=NAME,
            channel_options=channel_options(config.server, config.network),
        )

    servicer = InferenceServicer(runtime, assemble, new_worker(cfg), stats, c.coalesce_tokens, c.coalesce_ms)

    async def reload(config: MeshConfig) -> str:
        servicer.swap(new_worker(config))
        return servicer.worker.name

    app = app_of(
        NAME,
        cfg,
        runtime,
        servicer,
        assemble,
        closers=[servicer.close],
        worker_status=lambda: stats.status(servicer.worker.name),
        reload=reload,
    )
    return app


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
