"""Post stage service: joins tokens into text, applies stop sequences and max_tokens."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from functools import partial

import grpc

from orchestrator.config import MeshConfig
from orchestrator.pipeline import post
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.stages import downstream, rpc_name, service_name
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "post"


class PostServicer(stages_pb2_grpc.PostServiceServicer):
    def __init__(self, runtime: StageRuntime, inference: Downstream[types_pb2.InferenceOutput]) -> None:
        self._rt, self._inference = runtime, inference

    async def Process(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.PostOutput]:
        body = partial(post.process, request, self._inference.stream(request, context))
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    runtime = StageRuntime.for_stage(NAME, cfg, telemetry, rpc_name(NAME))
    inference: Downstream[types_pb2.InferenceOutput] = downstream("inference", cfg, telemetry)
    servicer = PostServicer(runtime, inference)
    return StageApp(
        NAME,
        runtime,
        register=lambda server: stages_pb2_grpc.add_PostServiceServicer_to_server(servicer, server),
        service_names=[service_name(NAME)],
        handler=servicer.Process,
        closers=[inference.close],
    )


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
