"""RAG stage logic: the configured retriever over an index or a JSON Lines corpus."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import cast

from orchestrator.core.config import RagConfig
from orchestrator.core.errors import StartupError
from orchestrator.core.scope import Scope
from orchestrator.retrieval.corpus import read_documents
from orchestrator.retrieval.embeddings import load_embedder
from orchestrator.retrieval.index import in_memory, open_index, read_manifest
from orchestrator.retrieval.search import Hit, Mode, Retriever
from orchestrator.v1 import types_pb2

log = logging.getLogger(__name__)


def build_retriever(cfg: RagConfig, current: Retriever | None = None) -> Retriever:
    """The retriever the configuration names, loaded and checked (an index built with another model is refused).
    ``current``, the retriever serving now, lends its embedding model when the configuration names the same one."""
    mode = cast(Mode, cfg.mode)
    corpus = cfg.documents or "the bundled corpus"
    if mode == "bm25" and not cfg.index:
        docs = read_documents(cfg.documents)[0]
        return Retriever(docs, mode, name=f"bm25 over {corpus} ({len(docs)} documents)")
    reuse = current.embedder if current is not None else None
    embedder = load_embedder(cfg.embedding_model, cfg.embedding_tokenizer, cfg.embedding_threads, reuse)
    if cfg.index:
        vectors = open_index(cfg.index, embedder)
        name = f"{mode} over index {cfg.index} generation {vectors.manifest.generation} ({len(vectors.docs)} documents)"
    else:
        docs = read_documents(cfg.documents)[0]
        if len(docs) > 1000:
            log.warning("embedding %d documents at start: `orchestrator index build` does it once", len(docs))
        vectors = in_memory(docs, embedder)
        name = f"{mode} over {corpus} ({len(docs)} documents)"
    log.info("retrieval: %s, model %s", name, embedder.name)
    generation = vectors.manifest.generation
    return Retriever(vectors.docs, mode, vectors, embedder, cfg.candidates, name, generation, cfg.embedding_batch)


async def follow_index(
    config: Callable[[], RagConfig], current: Callable[[], Retriever], swap: Callable[[Retriever], None]
) -> None:
    """Reopen the index whenever a writer has published a new generation, checking every ``index_check_s``: every
    replica reading a shared index directory follows it without being told. ``config`` is the stage's current
    settings (a reload may name another index). An index that cannot be read is reported (once per reason) and the
    retriever in use keeps serving."""
    reported = ""
    while True:
        await asyncio.sleep(config().index_check_s or 1.0)
        cfg = config()
        if not cfg.index or not cfg.index_check_s:
            continue
        try:
            if read_manifest(cfg.index).generation == current().generation:
                continue
            swap(await asyncio.to_thread(build_retriever, cfg, current()))
            reported = ""
        except (StartupError, OSError) as exc:
            if str(exc) != reported:
                log.error("index %s: %s; still serving %s", cfg.index, exc, current().name)
                reported = str(exc)


def _document(hit: Hit) -> types_pb2.Document:
    d = hit.doc
    return types_pb2.Document(
        id=d.id,
        title=d.title,
        text=d.text,
        score=hit.score,
        bm25_score=hit.bm25_score,
        dense_score=hit.dense_score,
        source=d.source,
    )


async def retrieve(
    request: types_pb2.PromptRequest, retriever: Retriever, top_k: int, delay_s: float, scope: Scope
) -> AsyncIterator[types_pb2.RagOutput]:
    """Yield one RagOutput with the top-k documents for the request's input."""
    if delay_s:
        await asyncio.sleep(delay_s)
    hits = await retriever.asearch(request.input, top_k)
    out = types_pb2.RagOutput(documents=[_document(h) for h in hits])
    if scope.span.is_recording():  # ids and scores, never the documents' text
        attrs: dict[str, str | float | int] = {"orchestrator.rag.mode": retriever.mode}
        for i, h in enumerate(hits):
            attrs[f"retrieval.documents.{i}.document.id"] = h.doc.id
            attrs[f"retrieval.documents.{i}.document.score"] = h.score
        scope.span.set_attributes(attrs)
    out.timings.append(scope.timing())
    yield out
