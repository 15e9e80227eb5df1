"""``orchestrator-client``: stream a completion from the mesh to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence

import grpc
from google.protobuf import json_format

from orchestrator_client import (
    AsyncOrchestratorClient,
    FinishReason,
    OrchestratorRpcError,
    build_request,
    tls_credentials,
)

DEFAULT_TARGET = "127.0.0.1:50055"
TOKEN_ENV = "ORCH_TOKEN"


def add_connection_args(p: argparse.ArgumentParser) -> None:
    """How to reach a secured mesh: TLS files and an API key (read from a file or $ORCH_TOKEN, never argv)."""
    p.add_argument("--ca-file", help="CA that signed the edge's certificate: connect over TLS")
    p.add_argument("--cert-file", help="this client's certificate, for an edge that asks for one (mutual TLS)")
    p.add_argument("--key-file", help="the client certificate's private key")
    p.add_argument("--tls", action="store_true", help="connect over TLS, checking the edge with the system's CAs")
    p.add_argument("--token-file", help="file holding an API key (default: $ORCH_TOKEN, if set)")


def connection_args(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """Channel credentials (None: plaintext) and API key from ``add_connection_args``' flags."""
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file)
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as fh:
            token = fh.read().strip()
    return credentials, token


def _meta(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"--meta takes key=value, got {item!r}")
        out[key] = value
    return out


async def _submit(args: argparse.Namespace) -> int:
    request = build_request(
        args.input,
        session=args.session,
        max_tokens=args.max_tokens,
        stop=args.stop,
        temperature=args.temperature,
        meta=_meta(args.meta),
    )
    started = time.perf_counter()
    first_ms = None
    credentials, token = connection_args(args)
    async with AsyncOrchestratorClient(
        args.target, retries=args.retries, credentials=credentials, token=token
    ) as client:
        try:
            async for chunk in client.submit_request(request, timeout=args.timeout):
                if first_ms is None:
                    first_ms = (time.perf_counter() - started) * 1000
                if args.json:
                    print(json_format.MessageToJson(chunk, indent=None), flush=True)
                    continue
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                if chunk.HasField("completion"):
                    done = chunk.completion
                    total_ms = (time.perf_counter() - started) * 1000
                    stages = " ".join(f"{t.stage}={t.duration_ms:.1f}ms" for t in done.timings)
                    print(file=sys.stdout)
                    print(
                        f"[{FinishReason.Name(done.finish_reason).removeprefix('FINISH_REASON_').lower()}; "
                        f"{done.usage.prompt_tokens} prompt + {done.usage.completion_tokens} completion tokens; "
                        f"first chunk {first_ms:.1f} ms, total {total_ms:.1f} ms; {stages}; "
                        f"request {chunk.request_id}]",
                        file=sys.stderr,
                    )
        except OrchestratorRpcError as err:
            hint = f"; retry after {err.retry_after_s * 1000:.0f} ms" if err.retry_after_s is not None else ""
            print(f"\nerror: {err}{hint}", file=sys.stderr)
            if args.json:
                print(json.dumps({"error": err.code.name, "stage": err.stage, "message": err.message}))
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchestrator-client", description="Stream a completion from the mesh to the terminal."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("submit", help="stream one completion to stdout (summary on stderr)")
    p.add_argument("input", help="the prompt input text")
    p.add_argument(
        "--target",
        default=os.environ.get("ORCH_TARGET", DEFAULT_TARGET),
        help="address of the Stream stage (default: $ORCH_TARGET or %(default)s)",
    )
    p.add_argument("--session", default="cli", help="session id (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=0, help="0 takes the server's default")
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--meta", action="append", default=[], help="metadata key=value (repeatable)")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        choices=range(5),
        metavar="0-4",
        help="retry a shed or unroutable request, waiting as long as the mesh asks (default: 0)",
    )
    p.add_argument("--json", action="store_true", help="print each chunk as one JSON line")
    add_connection_args(p)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_submit(args))
    except (argparse.ArgumentTypeError, ValueError, OSError) as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
