"""``orchestrator dlq list|show|replay|purge``: the dead letters of the store the configuration names."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
import uuid
from typing import Any

from orchestrator.core.calls import REPLAY_OF_KEY, REPLAY_TRACE_KEY
from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import EDGE
from orchestrator.runtime.deadletters import DeadLetter, Filter, Store
from orchestrator.runtime.dlq import open_store
from orchestrator.v1 import types_pb2
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError
from orchestrator_client.cli import add_connection_args, connection_args

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str) -> float:
    """``90s``, ``15m``, ``2h``, ``1d`` ago, or an ISO 8601 time: as Unix time."""
    if value and value[-1] in _UNITS and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * _UNITS[value[-1]]
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--since takes 90s, 15m, 2h, 1d or an ISO time, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("dlq", help="list, show, replay or purge dead letters (requests that failed after admission)")
    p.add_argument("action", choices=("list", "show", "replay", "purge"))
    p.add_argument("ids", nargs="*", help="dead letter ids (show, replay, purge)")
    p.add_argument("--config", help="pipeline TOML with the [dlq] store (default: $ORCH_CONFIG, ./pipeline.toml)")
    p.add_argument("--since", type=parse_since, help="only letters since: 90s, 15m, 2h, 1d ago, or an ISO time")
    p.add_argument("--stage", default="", help="only letters a stage ended")
    p.add_argument("--status", default="", help="only letters with this status (UNAVAILABLE, INTERNAL, ...)")
    p.add_argument("--session", default="", help="only letters of a session")
    p.add_argument("--all", action="store_true", help="purge: every letter (a filter or ids otherwise)")
    p.add_argument("--json", action="store_true", help="list, show: one JSON object per letter")
    p.add_argument("--target", help="replay: the edge (default: $ORCH_TARGET, else the configured edge)")
    add_connection_args(p)


def _row(x: DeadLetter) -> str:
    when = datetime.datetime.fromtimestamp(x.at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    replayed = f"  replayed {x.replays[-1]['status']}" if x.replays else ""
    kept = "" if x.request is not None else "  (request not kept)"
    return (
        f"{x.id}  {when}  {x.stage:<9} {x.status:<18} session={x.session} request={x.request_id} "
        f"tokens={x.tokens_streamed}{kept}{replayed}"
    )


async def _replay(store: Store, letters: list[DeadLetter], args: argparse.Namespace, target: str) -> int:
    credentials, token = connection_args(args)
    failed = 0
    async with AsyncOrchestratorClient(target, credentials=credentials, token=token) as client:
        for x in letters:
            if x.request is None:
                print(f"{x.id}: not replayed: its request was not kept (dlq.keep_request is off)")
                failed += 1
                continue
            request = types_pb2.PromptRequest.FromString(x.request)
            request.request_id = uuid.uuid4().hex  # a new request, which records the one it replays
            metadata = [(REPLAY_OF_KEY, x.id)]
            if x.trace_id and x.span_id:
                metadata.append((REPLAY_TRACE_KEY, f"{x.trace_id}-{x.span_id}"))
            status = "OK"
            try:
                async for _ in client.submit_request(request, metadata=metadata, timeout=120):
                    pass
            except OrchestratorRpcError as err:
                status, failed = err.code.name, failed + 1
            await store.record_replay(x.id, {"request_id": request.request_id, "status": status, "at": time.time()})
            print(f"{x.id}: replayed as {request.request_id}: {status}")
    return 1 if failed else 0


async def _run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    store = open_store(cfg.dlq)
    if store is None:
        print("dead letters are off (dlq.store = off)", file=sys.stderr)
        return 1
    try:
        where = Filter(
            since=args.since, stage=args.stage, status=args.status, session=args.session, ids=tuple(args.ids)
        )
        if args.action == "purge" and where == Filter() and not args.all:
            print("purge needs ids, a filter or --all", file=sys.stderr)
            return 2
        letters = await store.list(where)
        if args.action == "purge":
            print(f"purged {await store.purge(where)} dead letter(s)")
        elif args.action == "replay":
            target = args.target or cfg.stage(EDGE).addresses()[0]
            return await _replay(store, letters, args, target)
        elif args.json or args.action == "show":
            for x in letters:
                print(json.dumps(x.to_json() | {"request": None if x.request is None else "(kept)"}))
        else:
            for x in letters:
                print(_row(x))
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
        return 0 if letters or args.action == "list" else 1
    finally:
        await store.close()


def run(args: argparse.Namespace, cfg: MeshConfig) -> int:
    if args.target is None:
        import os

        args.target = os.environ.get("ORCH_TARGET") or None
    return asyncio.run(_run(args, cfg))
