"""Post stage service: joins tokens into text, applies stop sequences and max_tokens."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

from orchestrator.core.calls import CallContext
from orchestrator.core.config import MeshConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.pipeline import post
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.transport import downstream_of
from orchestrator.stages import app_of, runtime_of
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "post"


class PostServicer(stages_pb2_grpc.PostServiceServicer):
    def __init__(self, runtime: StageRuntime, inference: Downstream[types_pb2.InferenceOutput]) -> None:
        self._rt, self._inference = runtime, inference

    async def Process(
        self, request: types_pb2.PromptRequest, context: CallContext
    ) -> AsyncIterator[types_pb2.PostOutput]:
        body = partial(post.process, request, self._inference.stream(request, context))
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    runtime = runtime_of(NAME, cfg, telemetry)
    inference = downstream_of(NAME, cfg, telemetry)
    return app_of(NAME, cfg, runtime, PostServicer(runtime, inference), inference)


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
