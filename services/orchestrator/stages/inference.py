"""Inference stage service: streams coalesced tokens from the configured model worker."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

import grpc

from orchestrator.config import MeshConfig
from orchestrator.pipeline import inference
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.stages import downstream, rpc_name, service_name
from orchestrator.v1 import stages_pb2_grpc, types_pb2
from orchestrator.workers.base import ModelWorker, build_worker

NAME = "inference"


class InferenceServicer(stages_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        runtime: StageRuntime,
        assemble: Downstream[types_pb2.AssembleOutput],
        worker: ModelWorker,
        stats: inference.WorkerStats,
        coalesce_tokens: int,
        coalesce_ms: float,
    ) -> None:
        self._rt, self._assemble, self._worker, self._stats = runtime, assemble, worker, stats
        self._coalesce = (coalesce_tokens, coalesce_ms)

    async def Infer(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.InferenceOutput]:
        body = partial(
            inference.infer,
            request,
            self._assemble.stream(request, context),
            self._worker,
            self._stats,
            *self._coalesce,
        )
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.inference
    worker = build_worker(c.worker)
    stats = inference.WorkerStats()
    # The worker's concurrency limit is the stage's: a slot is a generation.
    runtime = StageRuntime.for_stage(NAME, cfg, telemetry, rpc_name(NAME))
    assemble: Downstream[types_pb2.AssembleOutput] = downstream("assemble", cfg, telemetry)
    servicer = InferenceServicer(runtime, assemble, worker, stats, c.coalesce_tokens, c.coalesce_ms)
    return StageApp(
        NAME,
        runtime,
        register=lambda server: stages_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server),
        service_names=[service_name(NAME)],
        closers=[assemble.close, worker.close],
        worker_stats=stats,
        worker_name=worker.name,
    )


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
