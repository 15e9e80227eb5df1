"""``python -m bench`` (what `make bench` runs): the mesh against its floors; JSON, Markdown and plots."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.report import markdown, plots
from bench.scenarios import SCENARIOS, run_suite, write_json
from bench.targets import mesh_env
from orchestrator.core.config import load_config
from orchestrator.runtime.server import settle_gc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark the mesh against its floors (JSON, Markdown and PNG plots)."
    )
    parser.add_argument("--scenarios", help=f"comma-separated (default: all): {', '.join(SCENARIOS)}")
    parser.add_argument("--full", action="store_true", help="3x longer runs (make bench-full)")
    parser.add_argument(
        "--scale", type=float, default=None, help="multiply run durations by this (default 1, 3 with --full)"
    )
    parser.add_argument("--out", default="bench-results/latest", help="results folder (default: %(default)s)")
    parser.add_argument("--publish", help="also copy results.md and the plots here (e.g. docs/perf)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()] if args.scenarios else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The load generator's collector is set like the stages' (see settle_gc), so its own pauses
    # do not show up as theirs in the tails it measures.
    settle_gc(load_config(env=mesh_env({})).server.gc_full_every)
    results = asyncio.run(run_suite(names, args.scale or (3.0 if args.full else 1.0)))
    write_json(results, out / "results.json")
    command = "make bench-full" if args.full else "make bench"
    (out / "results.md").write_text(markdown(results, command))
    written = plots(results, out)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, " + ", ".join(str(p) for p in written))
    if args.publish:
        dest = Path(args.publish)
        dest.mkdir(parents=True, exist_ok=True)
        for path in [out / "results.md", *written]:
            shutil.copy(path, dest / path.name)
        print(f"published to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
