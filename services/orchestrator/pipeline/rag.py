"""RAG stage logic: BM25 retrieval over a small JSON Lines corpus."""

from __future__ import annotations

import asyncio
import heapq
import json
import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from orchestrator.core.scope import Scope
from orchestrator.v1 import types_pb2

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how in is it its of on or so that the their then this to "  # noqa: SIM905
    "was what when where which who why will with".split()
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str


def load_documents(path: str = "") -> list[Doc]:
    """Documents from a JSON Lines file (``id``, ``title``, ``text``); the bundled corpus by default."""
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    else:
        lines = resources.files("orchestrator.data").joinpath("docs.jsonl").read_text(encoding="utf-8").splitlines()
    docs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            docs.append(Doc(str(raw["id"]), str(raw.get("title", "")), str(raw["text"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path or 'bundled corpus'} line {n}: not a document ({exc})") from None
    return docs


class Bm25Index:
    """Okapi BM25 over an in-memory corpus (k1=1.5, b=0.75)."""

    def __init__(self, docs: Iterable[Doc], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = list(docs)
        postings: dict[str, list[tuple[int, int]]] = {}
        lengths: list[int] = []
        for i, doc in enumerate(self.docs):
            counts = Counter(terms(f"{doc.title} {doc.text}"))
            lengths.append(sum(counts.values()))
            for term, tf in counts.items():
                postings.setdefault(term, []).append((i, tf))
        n = len(self.docs)
        avg = (sum(lengths) / n) if n else 0.0
        # Each (term, document) contribution to a score is fixed by the corpus: computed once here,
        # a search only adds up the contributions of the query's terms.
        self._weights: dict[str, list[tuple[int, float]]] = {}
        for term, post in postings.items():
            idf = math.log(1 + (n - len(post) + 0.5) / (len(post) + 0.5))
            self._weights[term] = [
                (i, idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / avg))) for i, tf in post
            ]

    def search(self, query: str, k: int) -> list[tuple[Doc, float]]:
        """The ``k`` best documents for ``query`` with their scores; documents sharing no term are left out."""
        if k <= 0:
            return []
        scores: dict[int, float] = {}
        for term in set(terms(query)):
            for i, weight in self._weights.get(term, ()):
                scores[i] = scores.get(i, 0.0) + weight
        best = heapq.nlargest(k, scores.items(), key=lambda item: (item[1], -item[0]))
        return [(self.docs[i], score) for i, score in best]


async def retrieve(
    request: types_pb2.PromptRequest, index: Bm25Index, top_k: int, delay_s: float, scope: Scope
) -> AsyncIterator[types_pb2.RagOutput]:
    """Yield one RagOutput with the top-k documents for the request's input."""
    if delay_s:
        await asyncio.sleep(delay_s)
    hits = index.search(request.input, top_k)
    out = types_pb2.RagOutput(
        documents=[types_pb2.Document(id=d.id, title=d.title, text=d.text, score=s) for d, s in hits]
    )
    out.timings.append(scope.timing())
    yield out
