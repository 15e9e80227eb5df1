"""RAG stage service: BM25, dense or hybrid retrieval."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from functools import partial

from orchestrator.core.calls import CallContext
from orchestrator.core.config import MeshConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.pipeline import rag
from orchestrator.retrieval.search import Retriever
from orchestrator.runtime.server import StageApp, run_stage_main
from orchestrator.runtime.stage import StageRuntime
from orchestrator.stages import app_of, runtime_of
from orchestrator.v1 import stages_pb2_grpc, types_pb2

NAME = "rag"


class RagServicer(stages_pb2_grpc.RagServiceServicer):
    def __init__(self, runtime: StageRuntime, retriever: Retriever, top_k: int, delay_s: float) -> None:
        self._rt, self.retriever, self._top_k, self._delay_s = runtime, retriever, top_k, delay_s

    async def Retrieve(
        self, request: types_pb2.PromptRequest, context: CallContext
    ) -> AsyncIterator[types_pb2.RagOutput]:
        body = partial(rag.retrieve, request, self.retriever, self._top_k, self._delay_s)
        async for out in self._rt.serve(request, context, body):
            yield out


def build(cfg: MeshConfig, telemetry: Telemetry) -> StageApp:
    c = cfg.rag
    retriever = rag.build_retriever(c)  # warm-up: the index and the model are loaded before SERVING
    runtime = runtime_of(NAME, cfg, telemetry)
    servicer = RagServicer(runtime, retriever, c.top_k, c.simulated_delay_ms / 1000)

    settings = [c]  # the current [rag] settings: a reload may name another index, which the follower then watches

    async def reload(config: MeshConfig) -> str:
        # The index again (a generation `orchestrator index add` wrote), off the loop; requests under way finish
        # with the retriever they started with. A bad index raises and the current retriever stays.
        servicer.retriever = await asyncio.to_thread(rag.build_retriever, config.rag, servicer.retriever)
        settings[0] = config.rag
        return servicer.retriever.name

    def swap(retriever: Retriever) -> None:
        servicer.retriever = retriever

    closers = []
    if c.index and c.index_check_s > 0 and _loop_running():
        follower = asyncio.get_running_loop().create_task(
            rag.follow_index(lambda: settings[0], lambda: servicer.retriever, swap)
        )

        async def stop_following() -> None:
            follower.cancel()

        closers.append(stop_following)
    return app_of(NAME, cfg, runtime, servicer, reload=reload, closers=closers, serving=lambda: servicer.retriever.name)


def _loop_running() -> bool:
    """Stage processes build on their loop; an in-process pipeline may be built before one runs."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def main() -> int:
    return run_stage_main(NAME, build)


if __name__ == "__main__":
    sys.exit(main())
