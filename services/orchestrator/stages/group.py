"""Several adjacent stages in one process (``server.layout``): ``python -m orchestrator.stages.group post+stream``.

Each stage is built as its own module builds it and serves its own gRPC service on its own port; a stage whose
callee is in the same process calls it in memory (``runtime.colocated``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.core.errors import StartupError
from orchestrator.core.graph import STAGES
from orchestrator.runtime.server import configure_logging, load_config_or_report, run_loop, serve_stages
from orchestrator.stages import module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchestrator stage GROUP",
        description="Run adjacent stages in one process, e.g. post+stream; each on its own port, calls between "
        "them in memory. Settings come from --config (or $ORCH_CONFIG) and ORCH_* variables.",
    )
    parser.add_argument("group", help="stages joined by +, e.g. rag+assemble")
    parser.add_argument("--config", help="pipeline TOML file (default: $ORCH_CONFIG, else built-in defaults)")
    parser.add_argument("--ready-dir", help="write <stage>.ready (address, pid: JSON) here for each stage once serving")
    args = parser.parse_args(argv)
    names = args.group.split("+")
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
    names.sort(key=STAGES.index)  # callee first: built before its caller, which calls it in memory
    cfg = load_config_or_report(args.config, args.group)
    if cfg is None:
        return 2
    configure_logging(cfg.server.log_level, args.group)
    builds = [(name, module(name).build) for name in names]
    ready_dir = Path(args.ready_dir) if args.ready_dir else None

    def ready(name: str) -> str | None:
        return str(ready_dir / f"{name}.ready") if ready_dir is not None else None

    try:
        run_loop(serve_stages(builds, cfg, ready, args.config), cfg.server.uvloop)
    except (OSError, StartupError) as exc:
        print(f"{args.group}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
