"""Stream stage service: the client-facing edge of the mesh."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence

from orchestrator.core.calls import CallContext
from orchestrator.core.config import MeshConfig
from orchestrator.core.scope import Scope
from orchestrator.core.telemetry import Telemetry
from orchestrator.pipeline import stream
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.transport import downstream_of
from orchestrator.stages import app_of, runtime_of
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
        self, request: types_pb2.PromptRequest, context: CallContext
    ) -> AsyncIterator[types_pb2.StreamChunk]:
        def body(scope: Scope) -> AsyncIterator[types_pb2.StreamChunk]:
            return stream.frame(request, self._post.stream(request, context), scope, self._sinks)

        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    runtime = runtime_of(NAME, cfg, telemetry)
    post = downstream_of(NAME, cfg, telemetry)
    sinks: list[stream.OutputSink] = [stream.LogSink()] if cfg.stream.log_sink else []
    return app_of(NAME, cfg, runtime, StreamServicer(runtime, post, sinks), post)


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
