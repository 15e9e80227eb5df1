"""Documents in JSON Lines: one object per line with ``id`` and ``text`` (``title`` and ``source`` optional)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from orchestrator.core.errors import StartupError

BUNDLED = "bundled corpus"
OnBad = Literal["refuse", "skip"]


@dataclass(frozen=True)
class Doc:
    id: str
    title: str
    text: str
    # Where the document came from (a file, a URL, a page), as the user gave it; "" when not given.
    source: str = ""

    def as_json(self) -> str:
        raw = {"id": self.id, "title": self.title, "text": self.text}
        if self.source:
            raw["source"] = self.source
        return json.dumps(raw, ensure_ascii=False)


class BadDocuments(StartupError):
    """Documents that cannot be read, each named by its line, when the caller refuses them."""

    def __init__(self, where: str, problems: list[str]) -> None:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        super().__init__(f"{where}: {len(problems)} bad document(s): {shown}")
        self.problems = problems


def _parse(line: str, n: int) -> Doc | str:
    """A document, or why line ``n`` is not one."""
    try:
        raw = json.loads(line)
    except ValueError as exc:
        return f"line {n}: invalid JSON ({exc.args[0].split(':')[0]})"
    if not isinstance(raw, dict):
        return f"line {n}: not a JSON object"
    missing = [k for k in ("id", "text") if k not in raw]
    if missing:
        return f"line {n}: missing field(s) {', '.join(missing)}"
    if not isinstance(raw["text"], str) or not raw["text"].strip():
        return f"line {n}: empty text"
    if not isinstance(raw["id"], str | int) or not str(raw["id"]).strip():
        return f"line {n}: id must be a non-empty string"
    return Doc(str(raw["id"]), str(raw.get("title") or ""), raw["text"], str(raw.get("source") or ""))


def iter_documents(lines: Iterator[str] | list[str]) -> Iterator[Doc | str]:
    """A document, or the problem naming its line, for every non-blank line; a repeated id is a problem too."""
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        got = _parse(line, n)
        if isinstance(got, Doc):
            if got.id in seen:
                got = f"line {n}: duplicate id {got.id!r}"
            else:
                seen.add(got.id)
        yield got


def read_documents(path: str = "", on_bad: OnBad = "refuse") -> tuple[list[Doc], list[str]]:
    """Documents of a JSON Lines file (the bundled corpus when ``path`` is empty) and the problems skipped.

    ``on_bad="refuse"`` raises :class:`BadDocuments` naming every bad line; ``"skip"`` returns them beside the
    documents so the caller can report them: nothing is dropped silently.
    """
    if path:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("orchestrator.data").joinpath("docs.jsonl").read_text(encoding="utf-8")
    docs: list[Doc] = []
    problems: list[str] = []
    for got in iter_documents(text.splitlines()):
        if isinstance(got, Doc):
            docs.append(got)
        else:
            problems.append(got)
    if problems and on_bad == "refuse":
        raise BadDocuments(path or BUNDLED, problems)
    return docs, problems
