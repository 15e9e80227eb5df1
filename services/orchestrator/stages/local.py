"""The same five stage functions composed in one process, with the same admission in front of each.

No gRPC: used by tests as the reference output and by the benchmark as its in-process floor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import STAGES
from orchestrator.core.requests import normalize_request
from orchestrator.core.scope import Scope
from orchestrator.pipeline import assemble, inference, post, rag, stream
from orchestrator.runtime.admission import Admission
from orchestrator.v1 import types_pb2
from orchestrator.workers.base import ModelWorker
from orchestrator.workers.registry import build_worker
from orchestrator.workers.stats import WorkerStats

T = TypeVar("T")


async def _admitted(
    admission: Admission, request_id: str, body: Callable[[Scope], AsyncIterator[T]]
) -> AsyncIterator[T]:
    async with await admission.acquire() as slot:
        async for item in body(Scope(admission.stage, request_id, slot.queue_s, slot.admitted_at)):
            yield item


class LocalPipeline:
    """RAG -> Assemble -> Inference -> Post -> Stream in this process, pulled from the Stream end."""

    def __init__(self, cfg: MeshConfig, worker: ModelWorker | None = None) -> None:
        self.cfg = cfg
        self.worker = worker or build_worker(cfg.inference.worker)
        self.worker_stats = WorkerStats()
        self._index = rag.Bm25Index(rag.load_documents(cfg.rag.documents))
        self.admissions = {
            name: Admission(name, cfg.stage(name).queue_capacity, cfg.stage(name).concurrency) for name in STAGES
        }

    def submit(self, request: types_pb2.PromptRequest) -> AsyncIterator[types_pb2.StreamChunk]:
        normalize_request(request, self.cfg.limits)
        c, rid, adm = self.cfg, request.request_id, self.admissions
        rag_out = _admitted(
            adm["rag"],
            rid,
            lambda s: rag.retrieve(request, self._index, c.rag.top_k, c.rag.simulated_delay_ms / 1000, s),
        )
        prompt = _admitted(
            adm["assemble"],
            rid,
            lambda s: assemble.assemble(request, rag_out, c.assemble.max_prompt_chars, c.assemble.prompt_template, s),
        )
        tokens = _admitted(
            adm["inference"],
            rid,
            lambda s: inference.infer(
                request,
                prompt,
                self.worker,
                self.worker_stats,
                c.inference.coalesce_tokens,
                c.inference.coalesce_ms,
                s,
            ),
        )
        text = _admitted(adm["post"], rid, lambda s: post.process(request, tokens, s))
        return _admitted(adm["stream"], rid, lambda s: stream.frame(request, text, s))
