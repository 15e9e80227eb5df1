"""Rewrite README.md's settings, metrics and stage tables from the code (`make docs`); a test fails when they drift."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.config import describe_settings
from orchestrator.core.graph import describe_graph
from orchestrator.core.telemetry import describe_metrics

README = Path(__file__).resolve().parents[2] / "README.md"


def replace_table(text: str, table: str) -> str:
    header = table.splitlines()[0]
    start = text.index(header)
    end = text.index("\n\n", start)
    return text[:start] + table + text[end:]


def main() -> None:
    text = README.read_text()
    for table in (describe_settings(), describe_metrics(), describe_graph()):
        text = replace_table(text, table)
    README.write_text(text)


if __name__ == "__main__":
    main()
