"""Okapi BM25 over an in-memory corpus, scored with numpy (one pass over the query terms' postings)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from orchestrator.retrieval.corpus import Doc

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be by do does for from how in is it its of on or so that the their then this to "  # noqa: SIM905
    "was what when where which who why will with".split()
)


def terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class Bm25Index:
    """Okapi BM25 (k1=1.5, b=0.75). Each (term, document) weight is fixed by the corpus, so it is computed once:
    a search adds up the weights of the query's terms with one ``bincount``."""

    def __init__(self, docs: Sequence[Doc], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = list(docs)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(len(self.docs), dtype=np.float64)
        for i, doc in enumerate(self.docs):
            counts = Counter(terms(f"{doc.title} {doc.text}"))
            lengths[i] = sum(counts.values())
            for term, count in counts.items():
                rows, tfs = postings.setdefault(term, ([], []))
                rows.append(i)
                tfs.append(count)
        n = len(self.docs)
        avg = float(lengths.mean()) if n else 0.0
        self._weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, (rows, tfs) in postings.items():
            r = np.asarray(rows, dtype=np.int64)
            tf = np.asarray(tfs, dtype=np.float64)
            idf = math.log(1 + (n - len(rows) + 0.5) / (len(rows) + 0.5))
            self._weights[term] = (r, idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[r] / avg)))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(row, score) of the ``k`` best documents, best first; documents sharing no term are left out."""
        found = [self._weights[t] for t in set(terms(query)) if t in self._weights]
        if k <= 0 or not found:
            return []
        rows = np.concatenate([r for r, _ in found])
        scores = np.bincount(rows, weights=np.concatenate([w for _, w in found]), minlength=len(self.docs))
        hit = np.flatnonzero(scores)
        if len(hit) > k:
            hit = hit[np.argpartition(-scores[hit], k - 1)[:k]]
        # Best first; equal scores by row so results are stable across replicas.
        order = np.lexsort((hit, -scores[hit]))
        return [(int(hit[i]), float(scores[hit[i]])) for i in order]
