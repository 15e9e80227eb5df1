"""Retrieval quality and speed over a labeled set built from WordNet (Debian's ``wordnet-base``).

The corpus is WordNet synsets: a document is one sense of a word, its title the sense's words and its text the
definition. A query is one of WordNet's own example sentences for a sense ("he needs a car to get to work"),
labeled with that sense. Senses are taken whole for words with several of them, so every query has documents
that share its word but mean something else: a lexical match alone cannot tell them apart, meaning alone misses
rare words; that is what hybrid retrieval is for.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.retrieval.corpus import Doc

WORDNET = Path("/usr/share/wordnet")
_POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers, as in "galore(ip)"
_EXAMPLE = re.compile(r'"([^"]+)"')


@dataclass(frozen=True)
class Sense:
    id: str
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]

    def doc(self) -> Doc:
        return Doc(self.id, ", ".join(self.words), self.definition, "wordnet")


def parse_line(line: str, pos: str) -> Sense | None:
    """One line of a WordNet ``data.<pos>`` file (see wndb(5)); None for the licence header."""
    if line.startswith("  ") or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    parts = fields.split()
    count = int(parts[3], 16)
    words = tuple(_MARKER.sub("", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2])
    examples = tuple(_EXAMPLE.findall(gloss))
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    return Sense(f"{pos}{parts[0]}", words, definition, examples)


def senses(directory: Path = WORDNET) -> Iterator[Sense]:
    for name, pos in _POS.items():
        with open(directory / f"data.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                sense = parse_line(line, pos)
                if sense is not None and sense.definition:
                    yield sense


@dataclass(frozen=True)
class LabeledSet:
    docs: list[Doc]
    # (query, the id of the one relevant document)
    queries: list[tuple[str, str]]


def labeled_set(size: int, max_queries: int, directory: Path = WORDNET) -> LabeledSet:
    """``size`` senses, every sense of each word taken in turn (words with most senses first, then by name), and
    up to ``max_queries`` of their example sentences, spread evenly over the corpus."""
    if not (directory / "data.noun").is_file():
        raise FileNotFoundError(f"no WordNet at {directory}: apt-get install wordnet-base")
    every = {s.id: s for s in senses(directory)}
    by_word: dict[str, list[str]] = {}
    for s in every.values():
        for w in s.words:
            by_word.setdefault(w.lower(), []).append(s.id)
    chosen: dict[str, Sense] = {}
    for _, ids in sorted(by_word.items(), key=lambda item: (-len(item[1]), item[0])):
        for sid in ids:
            if len(chosen) < size:
                chosen.setdefault(sid, every[sid])
        if len(chosen) >= size:
            break
    docs = [s.doc() for s in chosen.values()]
    with_examples = [s for s in chosen.values() if s.examples]
    step = max(1, len(with_examples) // max_queries)
    queries = [(s.examples[0], s.id) for s in with_examples[::step][:max_queries]]
    return LabeledSet(docs, queries)
