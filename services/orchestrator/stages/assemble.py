"""Assemble stage service: builds the prompt from the RAG stage's documents."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

from orchestrator.core.calls import CallContext
from orchestrator.core.config import MeshConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.pipeline import assemble
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.transport import downstream_of
from orchestrator.stages import app_of, runtime_of
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "assemble"


class AssembleServicer(stages_pb2_grpc.AssembleServiceServicer):
    def __init__(
        self, runtime: StageRuntime, rag: Downstream[types_pb2.RagOutput], max_chars: int, template: str
    ) -> None:
        self._rt, self._rag, self._max_chars, self._template = runtime, rag, max_chars, template

    async def Assemble(
        self, request: types_pb2.PromptRequest, context: CallContext
    ) -> AsyncIterator[types_pb2.AssembleOutput]:
        body = partial(assemble.assemble, request, self._rag.stream(request, context), self._max_chars, self._template)
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    runtime = runtime_of(NAME, cfg, telemetry)
    rag = downstream_of(NAME, cfg, telemetry)
    c = cfg.assemble
    return app_of(NAME, cfg, runtime, AssembleServicer(runtime, rag, c.max_prompt_chars, c.prompt_template), rag)


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
