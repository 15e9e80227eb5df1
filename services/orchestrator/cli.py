"""``orchestrator``: run the mesh, the demo, a single stage, or check the configuration."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.core.config import ConfigError, MeshConfig, describe_settings, load_config
from orchestrator.core.graph import EDGE, STAGES
from orchestrator.launcher import LaunchError, start_mesh

if TYPE_CHECKING:  # grpc is imported where it is used: `orchestrator validate` and `config` start faster
    import grpc

    from orchestrator.v1 import admin_pb2

DEFAULT_CONFIG = "pipeline.toml"


def _config_path(arg: str | None) -> str | None:
    """--config, else $ORCH_CONFIG (load_config reads it), else ./pipeline.toml when present."""
    if arg:
        return arg
    if os.environ.get("ORCH_CONFIG"):
        return None
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None


def _load(path: str | None) -> MeshConfig | None:
    """The config, or None after printing every problem in it (the command then exits with 1)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    cfg = _load(path)
    if cfg is None:
        return 1
    print(f"configuration OK ({path or 'built-in defaults'}, with ORCH_* overrides)")
    for name in STAGES:
        st = cfg.stage(name)
        print(
            f"  {name:<9} listen {st.host}:{st.port:<5}  reached at {','.join(st.addresses())}  "
            f"queue {st.queue_capacity}  concurrency {st.concurrency}"
        )
    print(f"  worker: {cfg.inference.worker.kind}")
    return 0


def _up(args: argparse.Namespace, demo: bool) -> int:
    path = _config_path(args.config)
    if args.layout:  # the stages' processes read it from their environment too
        os.environ["ORCH_SERVER_LAYOUT"] = args.layout
    cfg = _load(path)
    if cfg is None:  # report config problems once, here, rather than from five processes
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="orchestrator-mesh-"))
    processes = " | ".join("+".join(g) for g in cfg.groups())
    print(f"starting {processes} (logs: {run_dir})", flush=True)
    try:
        mesh = start_mesh(run_dir, config=path, log_to_files=demo or not args.foreground_logs)
    except (LaunchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        for name in STAGES:
            for proc in mesh.replicas[name]:
                shared = f" (with {'+'.join(proc.group)})" if proc.group else ""
                print(f"  {proc.key:<11} {proc.address}  pid {proc.popen.pid}{shared}", flush=True)
        if demo:
            from orchestrator.core.telemetry import build_telemetry
            from orchestrator.demo import run_demo

            telemetry = build_telemetry("demo-client")
            if telemetry.tracing:
                print(f"tracing to {os.environ.get('OTEL_EXPORTER_OTLP_ENDPOINT', 'the OTLP endpoint')}", flush=True)
            from orchestrator.runtime.security import channel_credentials

            credentials = channel_credentials(mesh.tls, EDGE)  # the operator's: the edge's own certificate
            demo_run = run_demo(
                mesh.clients_target,
                sys.stdout,
                tracer_provider=telemetry.tracer_provider,
                credentials=credentials,
                trace_url=args.trace_url or "",
            )
            counts = asyncio.run(demo_run)
            telemetry.shutdown()
            ok = counts["completed"] == sum(counts.values())
        else:
            print(f"\nmesh is up; entry (Stream stage): {mesh.entry}", flush=True)
            if mesh.clients_target != mesh.entry:
                print(f"every edge replica, for a round_robin client: {mesh.clients_target}", flush=True)
            print(f'try: orchestrator-client submit --target {mesh.entry} "What is backpressure?"', flush=True)
            print("Ctrl-C stops all five stages.", flush=True)
            _wait_for_signal()
            ok = True
    finally:
        codes = mesh.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        print(f"stopped all five stages{'' if not bad else f' (non-zero exits: {bad})'}", flush=True)
    return 0 if ok and not bad else 1


def _status(args: argparse.Namespace) -> int:
    """Every replica's queue, counters and worker. Without addresses, the mesh is walked from the edge: each stage
    says which replicas of the next one it calls, so replicas on free ports or found by DNS are listed too."""
    import grpc

    from orchestrator.v1 import admin_pb2, admin_pb2_grpc

    cfg = _load(_config_path(args.config))
    if cfg is None:
        return 1
    walk = bool(args.walk_from) or (not args.addresses and not any(cfg.stage(n).admin_port > 0 for n in STAGES))
    if args.addresses:
        queue: list[tuple[str | None, str]] = [(None, addr) for addr in args.addresses]
    elif walk:
        queue = [(EDGE, addr) for addr in (args.walk_from or cfg.stage(EDGE).addresses())]
    else:  # each stage's admin listener, on this machine
        queue = [(name, addr) for name in STAGES for addr in _admin_addresses(cfg, name)]
    print(
        f"{'stage':<10} {'address':<22} {'waiting':>9} {'active':>9} {'limit':>10} {'admitted':>9} {'shed':>7} "
        f"{'ok':>8} {'invalid':>7} {'denied':>7} {'limited':>7} {'failed':>7} {'cancel':>7}  process  serving"
    )
    metadata = _admin_metadata(args.token_file)
    failed = 0
    seen: set[str] = set()
    while queue:
        name, address = queue.pop(0)
        if address in seen:
            continue
        seen.add(address)
        with _admin_channel(cfg, address, name) as channel:
            try:
                s = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                    admin_pb2.GetStatusRequest(), timeout=2, metadata=metadata
                )
            except grpc.RpcError as err:
                print(f"{name or '?':<10} {address:<22} {err.code().name}: {err.details()}")
                failed += 1
                continue
        print(_status_row(s, address))
        if walk:
            queue += [(c.stage, c.address) for c in s.callees]
    return 1 if failed else 0


def _status_row(s: admin_pb2.GetStatusResponse, address: str) -> str:
    q, c, w = s.queue, s.counters, s.worker
    worker = f"{w.name} ({w.active} generating, {w.tokens_generated} tokens)" if w.name else s.serving
    return (
        f"{s.stage:<10} {address:<22} {f'{q.waiting}/{q.capacity}':>9} {q.active:>9} "
        f"{f'{q.concurrency}/{q.concurrency_max}':>10} {c.admitted:>9} {c.shed:>7} {c.ok:>8} {c.invalid:>7} "
        f"{c.denied:>7} {c.rate_limited:>7} {c.failed:>7} {c.cancelled:>7}  {s.process.rpartition(':')[2]:>7}  {worker}"
    )


def _admin_addresses(cfg: MeshConfig, name: str) -> tuple[str, ...]:
    """Where a stage's AdminService answers: its own listener when it has one (on this machine), else the stage."""
    port = cfg.stage(name).admin_port
    return (f"{cfg.server.admin_host}:{port}",) if port > 0 else cfg.stage(name).addresses()


def _admin_channel(cfg: MeshConfig, address: str, stage: str | None) -> grpc.Channel:
    """A channel to an AdminService: plaintext to a stage's own admin listener on loopback (which serves no TLS),
    else as the stages are reached."""
    import grpc

    from orchestrator.runtime.security import operator_channel

    if admin_listener(cfg, address):
        return grpc.insecure_channel(address)
    return operator_channel(cfg.tls, address, stage)


def admin_listener(cfg: MeshConfig, address: str) -> bool:
    """Whether ``address`` is a stage's own admin listener on this machine (``<stage>.admin_port``)."""
    from orchestrator.core.config import is_loopback

    host, _, port = address.rpartition(":")
    admin_ports = {cfg.stage(name).admin_port for name in STAGES} - {-1, 0}
    return is_loopback(host.strip("[]")) and port.isdigit() and int(port) in admin_ports


def _admin_metadata(token_file: str | None) -> tuple[tuple[str, str], ...]:
    """An admin key for AdminService, from ``--token-file`` or $ORCH_TOKEN (never the command line)."""
    token = os.environ.get("ORCH_TOKEN") or None
    if token_file:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


def _keys(args: argparse.Namespace) -> int:
    """``orchestrator keys add|revoke|list FILE``: the file holds hashes only; a new key is printed once."""
    from orchestrator.runtime.tenants import key_line, new_key, parse_keys

    path = Path(args.file)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    try:
        keys = parse_keys(text, str(path))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.action == "list":
        for entry in keys.values():
            limits = ", ".join(
                f"{k} {v:g}" for k in ("rate", "burst", "max_streams") if (v := getattr(entry, k)) is not None
            )
            print(f"{entry.tenant:<24} {entry.role:<7} {entry.digest.hex()[:12]}  {limits}")
        return 0
    if args.action == "revoke":
        kept = [line for line in text.splitlines() if not _names_tenant(line, args.tenant)]
        removed = len(text.splitlines()) - len(kept)
        _write_private(path, "".join(f"{line}\n" for line in kept))
        print(f"revoked {removed} key(s) of tenant {args.tenant!r}; stages stop accepting them within a second")
        return 0 if removed else 1
    secret = new_key()
    line = key_line(
        secret,
        args.tenant,
        "admin" if args.admin else "client",
        rate=args.rate,
        burst=args.burst,
        max_streams=args.max_streams,
    )
    _write_private(path, text + ("" if not text or text.endswith("\n") else "\n") + line + "\n")
    print(secret)
    print(f"added a key for tenant {args.tenant!r} to {path}; it is shown only now", file=sys.stderr)
    return 0


def _names_tenant(line: str, tenant: str) -> bool:
    import json

    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("tenant") == tenant


def _write_private(path: Path, text: str) -> None:
    """Replace ``path`` atomically with an owner-only file: a reader sees the old keys or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    tmp.replace(path)


def _health(address: str, timeout_s: float, config: str | None) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orchestrator.runtime.security import operator_channel

    cfg = _load(_config_path(config))
    if cfg is None:
        return 1
    with operator_channel(cfg.tls, address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            print(f"{address}: {err.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _stage(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """One stage (its own module's main), or adjacent stages in one process (``stages.group``)."""
    config = ["--config", args.config] if args.config else []
    if "+" in args.name:
        from orchestrator.stages.group import main as group

        return group([args.name, *config, *(["--ready-dir", args.ready_dir] if args.ready_dir else [])])
    if args.name not in STAGES:
        parser.error(f"unknown stage {args.name!r}; stages: {', '.join(STAGES)}")
    from orchestrator.stages import module

    return _run_stage(module(args.name), _stage_argv(args))


def _run_stage(module: object, argv: list[str]) -> int:
    from orchestrator.runtime.server import run_stage_main

    return run_stage_main(module.NAME, module.build, argv)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchestrator", description="Run the mesh, its demo or one stage; check configuration and status."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in (
        ("demo", "start the mesh, send 10 demo requests, print answers and a summary, stop"),
        ("up", "start the mesh and keep it in the foreground until Ctrl-C"),
        ("validate", "check the configuration and print the resolved stage layout"),
    ):
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", help=f"pipeline TOML (default: $ORCH_CONFIG, else ./{DEFAULT_CONFIG} if present)")
        if name == "up":
            p.add_argument("--foreground-logs", action="store_true", help="stage logs to this terminal")
        if name == "demo":
            p.add_argument("--trace-url", help="print each answer's trace as this URL, {trace_id} filled in")
        if name in ("up", "demo"):
            p.add_argument(
                "--layout",
                help="stages that share a process, e.g. rag+assemble,inference,post+stream "
                "(default: server.layout, else a process per stage)",
            )
    p = sub.add_parser("config", help="list every setting with its ORCH_* variable and default (Markdown)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--metrics", action="store_true", help="list the Prometheus metrics instead")
    shown.add_argument("--stages", action="store_true", help="list the stages, their RPCs and who calls whom instead")
    p = sub.add_parser("status", help="queue, counters and worker of every stage (AdminService/GetStatus)")
    p.add_argument("--config", help=f"pipeline TOML with the stage addresses (default: ./{DEFAULT_CONFIG} if present)")
    p.add_argument("addresses", nargs="*", help="host:port of stages to ask instead of the configured ones")
    p.add_argument("--token-file", help="file holding an admin API key (default: $ORCH_TOKEN, if set)")
    p.add_argument(
        "--from",
        dest="walk_from",
        metavar="EDGE",
        action="append",
        help="walk the mesh from this edge address (repeatable; default: the configured one): every replica it reaches",
    )
    from orchestrator.dlq_cli import add_parser as add_dlq
    from orchestrator.index_cli import add_parser as add_index

    add_dlq(sub)
    add_index(sub)
    p = sub.add_parser("keys", help="add, revoke or list API keys in a keys file (auth.keys_file)")
    p.add_argument("action", choices=("add", "revoke", "list"))
    p.add_argument("file", help="the keys file (created owner-only)")
    p.add_argument("--tenant", help="the tenant a key names (add, revoke)")
    p.add_argument("--admin", action="store_true", help="an admin key: AdminService on every stage")
    p.add_argument("--rate", type=float, help="this tenant's requests a second (default: tenants.rate)")
    p.add_argument("--burst", type=int, help="requests above the rate at once (default: tenants.burst)")
    p.add_argument("--max-streams", type=int, help="open streams at once (default: tenants.max_streams)")
    p = sub.add_parser("health", help="exit 0 if the stage at ADDRESS reports SERVING (container health checks)")
    p.add_argument("address", help="host:port of a stage")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default: %(default)s)")
    p.add_argument("--config", help="pipeline TOML, for its TLS settings (default: ORCH_* variables)")
    sub.add_parser(
        "worker-server", help="serve the configured model worker over ModelWorkerService (see --help)", add_help=False
    )
    p = sub.add_parser("stage", help="run one stage, or adjacent stages joined by + (post+stream), in this process")
    p.add_argument("name", help=f"a stage ({', '.join(STAGES)}) or stages joined by +")
    p.add_argument("--config")
    p.add_argument("--ready-file", help="one stage: write its address here once serving")
    p.add_argument("--ready-dir", help="stages joined by +: write <stage>.ready here for each")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker-server"]:
        from orchestrator.stages.worker_server import main as worker_server

        return worker_server(argv[1:])
    args = parser.parse_args(argv)
    commands: dict[str, Callable[[], int]] = {
        "validate": lambda: _validate(args),
        "config": lambda: _config(args),
        "status": lambda: _status(args),
        "dlq": lambda: _dlq(args),
        "index": lambda: _index(args, parser),
        "keys": lambda: _keys(args) if args.action == "list" or args.tenant else _needs_tenant(parser, args),
        "health": lambda: _health(args.address, args.timeout, args.config),
        "stage": lambda: _stage(args, parser),
    }
    return commands.get(args.command, lambda: _up(args, demo=args.command == "demo"))()


def _config(args: argparse.Namespace) -> int:
    from orchestrator.core.graph import describe_graph
    from orchestrator.core.telemetry import describe_metrics

    print(describe_metrics() if args.metrics else describe_graph() if args.stages else describe_settings())
    return 0


def _dlq(args: argparse.Namespace) -> int:
    from orchestrator.dlq_cli import run

    cfg = _load(_config_path(args.config))
    return 1 if cfg is None else run(args, cfg)


def _index(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from orchestrator.index_cli import run

    return run(args, parser)


def _needs_tenant(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser.error(f"keys {args.action} needs --tenant")


def _stage_argv(args: argparse.Namespace) -> list[str]:
    out = ["--config", args.config] if args.config else []
    return out + (["--ready-file", args.ready_file] if args.ready_file else [])


if __name__ == "__main__":
    sys.exit(main())
