"""``orchestrator index build|add|info|search``: a vector index of the user's documents for the RAG stage."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from orchestrator.core.errors import StartupError
from orchestrator.retrieval import index
from orchestrator.retrieval.corpus import Doc, read_documents
from orchestrator.retrieval.embeddings import load_embedder
from orchestrator.retrieval.search import MODES, Retriever


def add_parser(sub: Any) -> None:
    p = sub.add_parser("index", help="build, extend, describe or query a vector index of your documents (rag.index)")
    p.add_argument("action", choices=("build", "add", "info", "search"))
    p.add_argument("paths", nargs="+", help="build: DOCS.jsonl; add: DIR DOCS.jsonl; info: DIR; search: DIR QUERY")
    p.add_argument("--out", help="build: the index directory to create")
    p.add_argument("--skip-bad", action="store_true", help="skip bad documents (each reported) instead of refusing")
    p.add_argument("--model", default="", help="ONNX sentence encoder (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--tokenizer", default="", help="its tokenizer.json (with --model)")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads embedding documents (default: every core)"
    )
    p.add_argument("--mode", choices=MODES, default="hybrid", help="search: retrieval mode (default: %(default)s)")
    p.add_argument("-k", type=int, default=3, help="search: documents to show (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="info, search: JSON")


class _Progress:
    """A bar on a terminal; elsewhere (CI logs, pipes) a line at every tenth of the work."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self._bar: Any = None
        self._next = max(1, total // 10)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="doc", file=sys.stderr)

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.done >= self._next or self.done == self.total:
            print(f"embedded {self.done:,} / {self.total:,} documents ({self.rate():.0f}/s)", file=sys.stderr)
            self._next += max(1, self.total // 10)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _documents(path: str, skip_bad: bool) -> list[Doc]:
    docs, problems = read_documents(path, "skip" if skip_bad else "refuse")
    for p in problems:
        print(f"{path} {p} (skipped)", file=sys.stderr)
    return docs


def _embedded(what: Callable[[Callable[[int], None]], index.Manifest], total: int) -> tuple[index.Manifest, float]:
    progress = _Progress(total)
    try:
        manifest = what(progress)
    finally:
        progress.close()
    return manifest, progress.rate()


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    wanted = {"build": 1, "add": 2, "info": 1, "search": 2}[args.action]
    if len(args.paths) != wanted:
        parser.error(f"index {args.action} takes {wanted} path(s): see `orchestrator index --help`")
    if args.action == "build" and not args.out:
        parser.error("index build needs --out DIR")
    try:
        return _run(args)
    except (StartupError, OSError) as exc:
        print(f"orchestrator index {args.action}: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.action == "info":
        m = index.read_manifest(args.paths[0])
        print(m.to_json() if args.json else _describe(args.paths[0], m))
        return 0
    embedder = load_embedder(args.model, args.tokenizer, max(1, args.threads))
    if args.action == "search":
        opened = index.open_index(args.paths[0], embedder)
        retriever = Retriever(opened.docs, args.mode, opened, embedder)
        for h in retriever.search(args.paths[1], args.k):
            row = {"id": h.doc.id, "score": h.score, "bm25": h.bm25_score, "dense": h.dense_score, "title": h.doc.title}
            print(json.dumps(row) if args.json else f"{h.score:8.4f}  {h.doc.id}  {h.doc.title}")
        return 0
    if args.action == "build":
        docs = _documents(args.paths[0], args.skip_bad)
        manifest, rate = _embedded(lambda p: index.build(args.out, docs, embedder, p), len(docs))
        print(f"built {args.out}: {manifest.documents:,} documents, {rate:.0f} documents/s, model {manifest.model}")
        return 0
    directory, path = args.paths
    docs = _documents(path, args.skip_bad)
    held: list[str] = []

    def add(progress: Callable[[int], None]) -> index.Manifest:
        manifest, problems = index.add(directory, docs, embedder, progress, skip_held=args.skip_bad)
        held.extend(problems)
        return manifest

    manifest, rate = _embedded(add, len(docs))
    for p in held:
        print(f"{path}: {p} (skipped)", file=sys.stderr)
    print(
        f"added {len(docs) - len(held):,} documents to {directory} ({rate:.0f} documents/s): now "
        f"{manifest.documents:,}, generation {manifest.generation}"
    )
    return 0


def _describe(directory: str, m: index.Manifest) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.updated_at))
    return (
        f"{directory}: {m.documents:,} documents, generation {m.generation}, updated {when} UTC\n"
        f"model {m.model} ({m.dim} dimensions, fingerprint {m.fingerprint}), format {index.FORMAT} v{index.VERSION}"
    )
