"""The on-disk index: documents, their vectors in a usearch HNSW graph, and a manifest naming the model.

A directory holds one index::

    manifest.json            format, version, model (name, fingerprint, dim), document count, generation
    documents-<gen>.jsonl    the documents, row r is key r in the vector graph
    vectors-<gen>.usearch    the HNSW graph with its vectors (usearch's own file format)

Writers (``build``, ``add``) hold ``.lock`` and publish a new generation by replacing ``manifest.json`` last, so a
reader, another RAG replica on the same shared directory for example, sees the old generation or the new one,
never a mix. The previous generation's files stay until the next write, for readers that opened them just before.
Readers memory-map the vector file read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.core.errors import StartupError
from orchestrator.retrieval.corpus import BadDocuments, Doc
from orchestrator.retrieval.embeddings import Embedder

FORMAT = "prompt-orchestrator-index"
VERSION = 1
MANIFEST = "manifest.json"
# Documents embedded at once while indexing: enough to keep the model's batches full, small enough to show progress.
CHUNK = 256
Progress = Callable[[int], None]


class BadIndex(StartupError):
    """The directory is not an index this process can read (missing, another format or version, another model)."""


@dataclass(frozen=True)
class Manifest:
    model: str
    fingerprint: str
    dim: int
    documents: int
    generation: int
    created_at: float
    updated_at: float

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}, indent=2, sort_keys=True)


def _graph(dim: int, vectors: np.ndarray) -> Any:
    """A new HNSW graph holding ``vectors``, row r as key r."""
    from usearch.index import Index

    graph = Index(ndim=dim, metric="cos", dtype="f32")
    if len(vectors):
        graph.add(np.arange(len(vectors)), vectors)
    return graph


def read_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise BadIndex(f"index {str(directory)!r}: no such directory")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadIndex(f"index {str(directory)!r}: no {MANIFEST} (build one with `orchestrator index build`)") from None
    except ValueError as exc:
        raise BadIndex(f"index {str(directory)!r}: {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BadIndex(f"index {str(directory)!r}: not a {FORMAT} directory")
    if raw.get("version") != VERSION:
        raise BadIndex(
            f"index {str(directory)!r}: format version {raw.get('version')}, this orchestrator reads version "
            f"{VERSION}: rebuild it with `orchestrator index build`"
        )
    try:
        return Manifest(
            str(raw["model"]),
            str(raw["fingerprint"]),
            int(raw["dim"]),
            int(raw["documents"]),
            int(raw["generation"]),
            float(raw["created_at"]),
            float(raw["updated_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadIndex(f"index {str(directory)!r}: {MANIFEST} lacks {exc}") from None


def check_model(directory: str | Path, manifest: Manifest, embedder: Embedder) -> None:
    if manifest.fingerprint != embedder.fingerprint or manifest.dim != embedder.dim:
        raise BadIndex(
            f"index {str(directory)!r} was built with embedding model {manifest.model} (fingerprint "
            f"{manifest.fingerprint}, {manifest.dim} dimensions); this process embeds with {embedder.name} "
            f"(fingerprint {embedder.fingerprint}, {embedder.dim} dimensions): rebuild the index with "
            "`orchestrator index build`, or configure the model it was built with"
        )


def _files(directory: Path, generation: int) -> tuple[Path, Path]:
    return directory / f"documents-{generation}.jsonl", directory / f"vectors-{generation}.usearch"


class VectorIndex:
    """An index in memory: its documents in row order and the vector graph over them (row = key)."""

    def __init__(self, docs: Sequence[Doc], graph: Any, manifest: Manifest, directory: Path | None = None) -> None:
        self.docs, self._graph, self.manifest, self.directory = list(docs), graph, manifest, directory

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(row, cosine similarity) of the ``k`` nearest documents, nearest first."""
        if k <= 0 or not self.docs:
            return []
        found = self._graph.search(vector, min(k, len(self.docs)))
        return [(int(key), 1.0 - float(d)) for key, d in zip(found.keys, found.distances, strict=True)]


def _load(directory: Path, manifest: Manifest, writable: bool = False) -> VectorIndex:
    from usearch.index import Index

    docs_path, vectors_path = _files(directory, manifest.generation)
    docs = [_doc(line) for line in docs_path.read_text(encoding="utf-8").splitlines() if line]
    if not vectors_path.is_file():
        raise FileNotFoundError(vectors_path)
    graph = Index.restore(str(vectors_path), view=not writable)
    if graph is None or len(graph) != len(docs) or len(docs) != manifest.documents:
        raise BadIndex(
            f"index {str(directory)!r}: generation {manifest.generation} is inconsistent ({len(docs)} documents, "
            f"{0 if graph is None else len(graph)} vectors, manifest says {manifest.documents}): rebuild it"
        )
    return VectorIndex(docs, graph, manifest, directory)


def _doc(line: str) -> Doc:
    raw = json.loads(line)
    return Doc(raw["id"], raw.get("title", ""), raw["text"], raw.get("source", ""))


def open_index(directory: str | Path, embedder: Embedder) -> VectorIndex:
    """Open the index's current generation; a writer replacing it just now costs one more try."""
    for attempt in range(3):
        manifest = read_manifest(directory)
        check_model(directory, manifest, embedder)
        try:
            return _load(Path(directory), manifest)
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def embed_documents(docs: Sequence[Doc], embedder: Embedder, progress: Progress | None = None) -> np.ndarray:
    """The vectors of ``docs`` (title and text), in chunks so ``progress`` hears after each."""
    out = np.empty((len(docs), embedder.dim), dtype=np.float32)
    for start in range(0, len(docs), CHUNK):
        chunk = docs[start : start + CHUNK]
        out[start : start + len(chunk)] = embedder.embed([passage(d) for d in chunk])
        if progress is not None:
            progress(len(chunk))
    return out


def passage(doc: Doc) -> str:
    """What is embedded for a document: its title, then its text."""
    return f"{doc.title}\n{doc.text}" if doc.title else doc.text


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _publish(directory: Path, docs: Sequence[Doc], graph: Any, manifest: Manifest) -> None:
    docs_path, vectors_path = _files(directory, manifest.generation)
    tmp = docs_path.with_suffix(".tmp")
    tmp.write_text("".join(d.as_json() + "\n" for d in docs), encoding="utf-8")
    os.replace(tmp, docs_path)
    graph.save(str(vectors_path))
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)  # the switch: readers now open this generation
    for old in range(manifest.generation - 1):  # keep the one before, for readers that just opened it
        for p in _files(directory, old):
            p.unlink(missing_ok=True)


def build(directory: str | Path, docs: Sequence[Doc], embedder: Embedder, progress: Progress | None = None) -> Manifest:
    """A new index of ``docs`` in ``directory`` (which must not hold one yet)."""
    out = Path(directory)
    with _locked(out):
        if (out / MANIFEST).exists():
            raise BadIndex(f"{str(out)!r} already holds an index: add to it with `orchestrator index add`")
        graph = _graph(embedder.dim, embed_documents(docs, embedder, progress))
        now = time.time()
        manifest = Manifest(embedder.name, embedder.fingerprint, embedder.dim, len(docs), 1, now, now)
        _publish(out, docs, graph, manifest)
        return manifest


def add(
    directory: str | Path,
    docs: Sequence[Doc],
    embedder: Embedder,
    progress: Progress | None = None,
    skip_held: bool = False,
) -> tuple[Manifest, list[str]]:
    """Add ``docs`` as a new generation. A document whose id the index holds already is refused (nothing is
    written) or, with ``skip_held``, skipped and returned as a problem."""
    out = Path(directory)
    with _locked(out):
        old = read_manifest(out)
        check_model(out, old, embedder)
        current = _load(out, old, writable=True)  # a copy of the graph in memory: the file stays for its readers
        held = {d.id for d in current.docs}
        problems = [f"id {d.id!r} is in the index already" for d in docs if d.id in held]
        if problems and not skip_held:
            raise BadDocuments(str(out), problems)
        fresh = [d for d in docs if d.id not in held]
        if fresh:
            keys = np.arange(old.documents, old.documents + len(fresh))
            current._graph.add(keys, embed_documents(fresh, embedder, progress))
        manifest = dataclasses.replace(
            old, documents=old.documents + len(fresh), generation=old.generation + 1, updated_at=time.time()
        )
        _publish(out, [*current.docs, *fresh], current._graph, manifest)
        return manifest, problems


def in_memory(docs: Sequence[Doc], embedder: Embedder) -> VectorIndex:
    """An index of ``docs`` that lives in this process only (a small corpus embedded at start)."""
    graph = _graph(embedder.dim, embed_documents(docs, embedder))
    now = time.time()
    return VectorIndex(docs, graph, Manifest(embedder.name, embedder.fingerprint, embedder.dim, len(docs), 0, now, now))
