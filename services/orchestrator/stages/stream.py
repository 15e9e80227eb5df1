"""Stream stage service: the client-facing edge of the mesh."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence

import grpc

from orchestrator.config import MeshConfig
from orchestrator.pipeline import stream
from orchestrator.pipeline.scope import Scope
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.stages import downstream, rpc_name, service_name
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "stream"


class StreamServicer(stages_pb2_grpc.StreamServiceServicer):
    def __init__(
        self,
        runtime: StageRuntime,
        post: Downstream[types_pb2.PostOutput],
        sinks: Sequence[stream.OutputSink],
    ) -> None:
        self._rt, self._post, self._sinks = runtime, post, sinks

    async def Submit(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.StreamChunk]:
        def body(scope: Scope) -> AsyncIterator[types_pb2.StreamChunk]:
            return stream.frame(request, self._post.stream(request, context), scope, self._sinks)

        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.stream
    runtime = StageRuntime.for_stage(NAME, cfg, telemetry, rpc_name(NAME))
    post: Downstream[types_pb2.PostOutput] = downstream("post", cfg, telemetry)
    sinks: list[stream.OutputSink] = [stream.LogSink()] if c.log_sink else []
    servicer = StreamServicer(runtime, post, sinks)
    return StageApp(
        NAME,
        runtime,
        register=lambda server: stages_pb2_grpc.add_StreamServiceServicer_to_server(servicer, server),
        service_names=[service_name(NAME)],
        handler=servicer.Submit,
        closers=[post.close],
    )


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
