"""BM25 retrieval and prompt assembly."""

from __future__ import annotations

import pytest

from orchestrator.core.errors import InvalidRequest
from orchestrator.pipeline.assemble import render_prompt
from orchestrator.retrieval.bm25 import Bm25Index
from orchestrator.retrieval.corpus import BadDocuments, Doc, read_documents
from orchestrator.v1 import types_pb2


def load_documents() -> list[Doc]:
    return read_documents()[0]


def test_bundled_corpus_loads() -> None:
    docs = load_documents()
    assert len(docs) >= 30
    assert len({d.id for d in docs}) == len(docs)


def test_bm25_ranks_the_relevant_document_first() -> None:
    docs = load_documents()
    index = Bm25Index(docs)
    assert docs[index.search("How does BM25 rank documents?", 3)[0][0]].id == "bm25"
    assert docs[index.search("what happens when the deadline passes", 3)[0][0]].id == "grpc-deadlines"
    assert index.search("zzz qqq", 3) == []
    assert index.search("bm25", 0) == []


def test_bm25_prefers_rarer_terms_and_shorter_documents() -> None:
    docs = [
        Doc("common", "", "queue"),
        Doc("rare", "", "shedding"),
        Doc("long", "", "shedding " + "filler " * 50),
        Doc("other", "", "queue"),
        Doc("more", "", "queue again"),
    ]
    ranked = [docs[row].id for row, _ in Bm25Index(docs).search("queue shedding", 5)]
    assert ranked[0] == "rare"
    assert ranked.index("rare") < ranked.index("long")


def test_bad_corpus_line_is_reported(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n{"title": "no id"}\n')
    with pytest.raises(BadDocuments, match="line 2: missing field"):
        read_documents(str(path))


def doc(i: str, score: float, text: str = "text") -> types_pb2.Document:
    return types_pb2.Document(id=i, title=i.upper(), text=text, score=score)


def test_prompt_contains_context_then_question() -> None:
    prompt, ids = render_prompt("Why?", [doc("b", 1.0), doc("a", 2.0)], 1000)
    assert ids == ["a", "b"]
    assert prompt.index("[a] A: text") < prompt.index("[b] B: text") < prompt.index("Question: Why?")


def test_least_relevant_context_is_dropped_to_fit() -> None:
    docs = [doc("a", 2.0, "x" * 100), doc("b", 1.0, "y" * 100)]
    full, _ = render_prompt("q", docs, 10_000)
    prompt, ids = render_prompt("q", docs, len(full) - 1)
    assert ids == ["a"]
    assert len(prompt) < len(full)


def test_input_that_cannot_fit_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="does not fit the prompt limit of 50"):
        render_prompt("q" * 100, [], 50)
