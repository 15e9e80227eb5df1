"""RAG stage service: BM25 retrieval."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

import grpc

from orchestrator.config import MeshConfig
from orchestrator.pipeline import rag
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.stages import rpc_name, service_name
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "rag"


class RagServicer(stages_pb2_grpc.RagServiceServicer):
    def __init__(self, runtime: StageRuntime, index: rag.Bm25Index, top_k: int, delay_s: float) -> None:
        self._rt, self._index, self._top_k, self._delay_s = runtime, index, top_k, delay_s

    async def Retrieve(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.RagOutput]:
        body = partial(rag.retrieve, request, self._index, self._top_k, self._delay_s)
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.rag
    index = rag.Bm25Index(rag.load_documents(c.documents))  # warm-up: the index exists before SERVING
    runtime = StageRuntime.for_stage(NAME, cfg, telemetry, rpc_name(NAME))
    servicer = RagServicer(runtime, index, c.top_k, c.simulated_delay_ms / 1000)
    return StageApp(
        NAME,
        runtime,
        register=lambda server: stages_pb2_grpc.add_RagServiceServicer_to_server(servicer, server),
        service_names=[service_name(NAME)],
        handler=servicer.Retrieve,
    )


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
