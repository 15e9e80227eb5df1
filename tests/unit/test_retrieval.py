"""Retrieval with the real embedding model and the real vector index: corpus checks, fusion, the index format."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from orchestrator.retrieval import index
from orchestrator.retrieval.corpus import BadDocuments, Doc, read_documents
from orchestrator.retrieval.embeddings import OnnxEmbedder, load_embedder
from orchestrator.retrieval.search import Retriever, fuse


@pytest.fixture(scope="module")
def embedder() -> OnnxEmbedder:
    return load_embedder()


DOCS = [
    Doc("cat", "Cats", "A small domesticated feline that purrs and hunts mice.", "pets.md"),
    Doc("car", "Cars", "A motor vehicle with four wheels, propelled by an internal combustion engine."),
    Doc("bread", "Baking", "Flour, water and yeast are kneaded into dough and baked in an oven."),
    Doc("tax", "Taxes", "Income tax returns are filed every April with the revenue service."),
]


def test_every_bad_line_is_named_and_nothing_is_dropped_silently(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        '{"id": "a", "text": "fine"}\n'
        "{not json\n"
        '{"title": "no id", "text": "x"}\n'
        '{"id": "b", "text": "   "}\n'
        '{"id": "a", "text": "again"}\n'
        "\n"
        '["a list"]\n'
        '{"id": "c", "text": "also fine", "source": "s.txt"}\n'
    )
    with pytest.raises(BadDocuments) as refused:
        read_documents(str(path))
    assert [p.split(":")[0] for p in refused.value.problems] == ["line 2", "line 3", "line 4", "line 5", "line 7"]
    assert "invalid JSON" in refused.value.problems[0] and "missing field(s) id" in refused.value.problems[1]
    assert "empty text" in refused.value.problems[2] and "duplicate id 'a'" in refused.value.problems[3]
    docs, problems = read_documents(str(path), "skip")
    assert [d.id for d in docs] == ["a", "c"] and docs[1].source == "s.txt"
    assert len(problems) == 5


def test_reciprocal_rank_fusion() -> None:
    # b is second in both rankings: it beats a and c, each first in one ranking only.
    assert [r for r, _ in fuse([[1, 2, 3], [4, 2, 5]], 3)] == [2, 1, 4]
    assert fuse([[1], [1]], 1)[0][1] == pytest.approx(2 / 61)
    assert fuse([[], []], 3) == []


def test_embeddings_are_unit_vectors_that_rank_by_meaning(embedder: OnnxEmbedder) -> None:
    v = embedder.embed(["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.6
    assert v[0] @ v[2] < 0.3
    # Batched (sorted by length inside) and one at a time give the same rows in the same order.
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]
    assert np.allclose(embedder.embed(texts), np.vstack([embedder.embed([t]) for t in texts]), atol=1e-4)


def test_dense_finds_a_paraphrase_bm25_cannot_and_hybrid_keeps_both(embedder: OnnxEmbedder) -> None:
    vectors = index.in_memory(DOCS, embedder)
    query = "automobile"  # no term in common with the car document
    assert Retriever(DOCS, "bm25").search(query, 2) == []
    dense = Retriever(DOCS, "dense", vectors, embedder).search(query, 1)
    assert dense[0].doc.id == "car" and dense[0].dense_score is not None and dense[0].bm25_score is None
    hybrid = Retriever(DOCS, "hybrid", vectors, embedder).search("feline " + query, 2)
    assert {h.doc.id for h in hybrid} == {"cat", "car"}
    assert next(h for h in hybrid if h.doc.id == "cat").bm25_score is not None


def test_build_add_and_reopen(tmp_path: Path, embedder: OnnxEmbedder) -> None:
    out = tmp_path / "ix"
    m = index.build(out, DOCS[:2], embedder)
    assert (m.documents, m.generation, m.model) == (2, 1, "all-MiniLM-L6-v2-int8")
    with pytest.raises(index.BadIndex, match="already holds an index"):
        index.build(out, DOCS, embedder)
    m, problems = index.add(out, DOCS[2:], embedder)
    assert (m.documents, m.generation, problems) == (4, 2, [])
    opened = index.open_index(out, embedder)
    assert [d.id for d in opened.docs] == ["cat", "car", "bread", "tax"]
    assert opened.docs[0].source == "pets.md"
    top = opened.search(embedder.embed(["kneading dough"])[0], 1)
    assert opened.docs[top[0][0]].id == "bread"
    # A document the index holds is refused (nothing written), or skipped and named.
    with pytest.raises(BadDocuments, match=r"'tax' is in the index already"):
        index.add(out, [DOCS[3], Doc("new", "", "fresh text")], embedder)
    assert index.read_manifest(out).generation == 2
    m, problems = index.add(out, [DOCS[3], Doc("new", "", "fresh text")], embedder, skip_held=True)
    assert (m.documents, m.generation, problems) == (5, 3, ["id 'tax' is in the index already"])
    # The generation before stays for readers that opened it; older ones go.
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        ".lock",
        "documents-2.jsonl",
        "documents-3.jsonl",
        "manifest.json",
        "vectors-2.usearch",
        "vectors-3.usearch",
    ]


class _OtherModel:
    name: str = "other-model"
    dim: int = 384
    fingerprint: str = "0" * 32

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise AssertionError("never embeds: the index is refused first")


def test_an_index_of_another_model_or_format_is_refused(tmp_path: Path, embedder: OnnxEmbedder) -> None:
    out = tmp_path / "ix"
    index.build(out, DOCS, embedder)
    with pytest.raises(
        index.BadIndex, match=r"built with embedding model all-MiniLM-L6-v2-int8.*embeds with other-model"
    ):
        index.open_index(out, _OtherModel())
    with pytest.raises(index.BadIndex, match="built with embedding model"):
        index.add(out, DOCS, _OtherModel())
    raw = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(raw | {"version": 99}))
    with pytest.raises(index.BadIndex, match="format version 99, this orchestrator reads version 1"):
        index.open_index(out, embedder)
    with pytest.raises(index.BadIndex, match=r"no manifest\.json"):
        index.open_index(tmp_path, embedder)
    with pytest.raises(index.BadIndex, match="no such directory"):
        index.open_index(tmp_path / "missing", embedder)


async def test_the_stage_follows_new_generations_and_keeps_serving_through_a_broken_one(
    tmp_path: Path, embedder: OnnxEmbedder
) -> None:
    import asyncio
    import logging

    from orchestrator.core.config import RagConfig
    from orchestrator.pipeline.rag import build_retriever, follow_index

    out = tmp_path / "ix"
    index.build(out, DOCS[:2], embedder)
    cfg = RagConfig(index=str(out), index_check_s=0.01)
    served = [build_retriever(cfg)]
    swapped, reported = asyncio.Event(), asyncio.Event()
    errors: list[str] = []

    def swap(retriever: Retriever) -> None:
        served.append(retriever)
        swapped.set()

    class Errors(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())
            reported.set()

    handler = Errors(logging.ERROR)
    logging.getLogger("orchestrator.pipeline.rag").addHandler(handler)
    follower = asyncio.create_task(follow_index(lambda: cfg, lambda: served[-1], swap))
    try:
        index.add(out, DOCS[2:], embedder)
        await asyncio.wait_for(swapped.wait(), 10)
        assert (served[-1].generation, len(served[-1].docs)) == (2, 4)
        assert served[-1].embedder is served[0].embedder  # a new generation, the same model session
        (out / "manifest.json").write_text("{}")
        await asyncio.wait_for(reported.wait(), 10)
        await asyncio.sleep(0.1)  # ten more checks: reported once, nothing swapped
        assert len(errors) == 1 and "not a prompt-orchestrator-index directory" in errors[0]
        assert len(served) == 2
    finally:
        follower.cancel()
        logging.getLogger("orchestrator.pipeline.rag").removeHandler(handler)


async def test_the_follower_watches_the_index_the_current_settings_name(tmp_path: Path, embedder: OnnxEmbedder) -> None:
    import asyncio

    from orchestrator.core.config import RagConfig
    from orchestrator.pipeline.rag import build_retriever, follow_index

    for name in ("a", "b"):
        index.build(tmp_path / name, DOCS[:2], embedder)
    settings = [RagConfig(index=str(tmp_path / "a"), index_check_s=0.01)]
    served = [build_retriever(settings[0])]
    swapped = asyncio.Event()

    def swap(retriever: Retriever) -> None:
        served.append(retriever)
        swapped.set()

    follower = asyncio.create_task(follow_index(lambda: settings[0], lambda: served[-1], swap))
    try:
        settings[0] = RagConfig(index=str(tmp_path / "b"), index_check_s=0.01)  # a reload named another index
        index.add(tmp_path / "b", DOCS[2:], embedder)
        await asyncio.wait_for(swapped.wait(), 10)
        assert served[-1].name.startswith(f"hybrid over index {tmp_path / 'b'} generation 2")
    finally:
        follower.cancel()
