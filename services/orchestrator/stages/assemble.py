"""Assemble stage service: builds the prompt from the RAG stage's documents."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

import grpc

from orchestrator.config import MeshConfig
from orchestrator.pipeline import assemble
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.stages import downstream, rpc_name, service_name
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "assemble"


class AssembleServicer(stages_pb2_grpc.AssembleServiceServicer):
    def __init__(self, runtime: StageRuntime, rag: Downstream[types_pb2.RagOutput], max_chars: int) -> None:
        self._rt, self._rag, self._max_chars = runtime, rag, max_chars

    async def Assemble(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.AssembleOutput]:
        body = partial(assemble.assemble, request, self._rag.stream(request, context), self._max_chars)
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.assemble
    runtime = StageRuntime.for_stage(NAME, cfg, telemetry, rpc_name(NAME))
    rag: Downstream[types_pb2.RagOutput] = downstream("rag", cfg, telemetry)
    servicer = AssembleServicer(runtime, rag, c.max_prompt_chars)
    return StageApp(
        NAME,
        runtime,
        register=lambda server: stages_pb2_grpc.add_AssembleServiceServicer_to_server(servicer, server),
        service_names=[service_name(NAME)],
        handler=servicer.Assemble,
        closers=[rag.close],
    )


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
