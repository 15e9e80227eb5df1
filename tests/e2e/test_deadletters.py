"""Dead letters, end to end: requests that fail after admission are kept (a real SQLite file, or a real nats-server),
listed, and replayed with ``orchestrator dlq`` once the backend is back."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from orchestrator.core.config import load_config
from orchestrator.launcher import Mesh
from orchestrator.runtime.deadletters import DeadLetter, Filter
from orchestrator.runtime.dlq import open_store
from orchestrator.workers.echo import echo_tokens
from orchestrator_client import OrchestratorRpcError
from tests.conftest import clean_env, mesh_client, orchestrator_cli, poll, scrape
from tests.e2e.test_backends import Backend, openai_env
from tests.e2e.test_tracing import otel_env
from tests.natsserver import nats_server
from tests.otlp import OtlpReceiver

pytestmark = pytest.mark.mesh

LONG_INPUT = "explain what a dead letter queue is for " * 40


@pytest.fixture(params=["sqlite", "nats"])
def dlq_env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """The store's settings; its files are under tmp_path/<store>."""
    if request.param == "sqlite":
        (tmp_path / "sqlite").mkdir()
        yield {"ORCH_DLQ_STORE": "sqlite", "ORCH_DLQ_PATH": str(tmp_path / "sqlite" / "dead-letters.db")}
        return
    with nats_server(tmp_path / "nats") as url:
        yield {"ORCH_DLQ_STORE": "nats", "ORCH_DLQ_NATS_URL": url}


def letters(env: dict[str, str], expect: int) -> list[DeadLetter]:
    """The store's letters, once there are ``expect`` of them (they are written off the requests' path)."""

    async def read() -> list[DeadLetter]:
        store = open_store(load_config(env=env).dlq)
        assert store is not None
        try:
            return await store.list(Filter())
        finally:
            await store.close()

    def enough() -> list[DeadLetter] | None:
        found = asyncio.run(read())
        return found if len(found) >= expect else None

    return poll(enough, timeout_s=15, interval_s=0.1, what=f"{expect} dead letters")


async def test_a_killed_stage_leaves_one_dead_letter_per_request_it_failed(
    fresh_mesh: Callable[..., Mesh], dlq_env: dict[str, str], receiver: OtlpReceiver, tmp_path: Path
) -> None:
    m = fresh_mesh(ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20", **dlq_env, **otel_env(receiver))
    async with mesh_client(m.entry) as client:
        streams = [client.submit(LONG_INPUT, session=f"victim-{i}", max_tokens=300, timeout=60) for i in range(3)]
        received: list[list[str]] = [[], [], []]
        ids = []
        for i, stream in enumerate(streams):
            chunk = await anext(stream)
            received[i].append(chunk.text)
            ids.append(chunk.request_id)
        m.kill("inference")

        async def drain(i: int) -> OrchestratorRpcError:
            with pytest.raises(OrchestratorRpcError) as info:
                async for chunk in streams[i]:
                    received[i].append(chunk.text)
            return info.value

        errors = await asyncio.gather(*(drain(i) for i in range(3)))
    assert all((e.code, e.stage) == (grpc.StatusCode.UNAVAILABLE, "inference") for e in errors)
    kept = await asyncio.to_thread(letters, dlq_env, 3)
    assert sorted(x.request_id for x in kept) == sorted(ids)  # exactly one per affected request
    by_request = {x.request_id: x for x in kept}
    for i, request_id in enumerate(ids):
        x = by_request[request_id]
        assert (x.stage, x.status) == ("inference", "UNAVAILABLE"), x
        assert x.tokens_streamed == len(echo_tokens("".join(received[i]))), x
        assert x.request is None  # dlq.keep_request is off: no user data

        def edge_span(request_id: str = request_id) -> list[str] | None:
            found = [
                s.trace_id
                for s in receiver.snapshot()
                if s.service == "stream" and s.attributes.get("orchestrator.request_id") == request_id
            ]
            return found or None

        assert poll(edge_span, timeout_s=15, what="the edge's span") == [x.trace_id], x
    # Counted by stage and status; and with dlq.keep_request off, no prompt text anywhere in the store's files.
    counted = scrape(m.stages["stream"].metrics_address)
    assert counted[("orchestrator_dead_letters_total", (("stage", "inference"), ("status", "UNAVAILABLE")))] == 3
    assert store_files_containing(tmp_path, b"dead letter queue is for") == []


def store_files_containing(root: Path, text: bytes) -> list[Path]:
    """The store's files (under ``root``) that hold ``text``; there are some files to search."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".log")]
    assert files
    return [p for p in files if text in p.read_bytes()]


def dlq(*args: str, env: dict[str, str], target: str = "") -> subprocess.CompletedProcess[str]:
    extra = ["--target", target] if target else []
    return orchestrator_cli("dlq", *args, *extra, env=clean_env(**env))


async def test_letters_of_a_failing_backend_are_replayed_once_it_is_back(
    fresh_mesh: Callable[..., Mesh], tmp_path: Path, receiver: OtlpReceiver
) -> None:
    backend = Backend()
    try:
        backend.mode = "500"
        env = {
            "ORCH_DLQ_STORE": "sqlite",
            "ORCH_DLQ_PATH": str(tmp_path / "dead-letters.db"),
            "ORCH_DLQ_KEEP_REQUEST": "true",
        }
        settings = openai_env(backend.base_url) | {
            "ORCH_INFERENCE_WORKER_RETRIES": "0",
            "ORCH_INFERENCE_WORKER_BREAKER_FAILURES": "0",
        }
        m = fresh_mesh(**settings, **env, **otel_env(receiver))
        started = time.time()
        async with mesh_client(m.entry) as client:
            for i in range(4):
                with pytest.raises(OrchestratorRpcError):
                    await client.complete(f"question {i} for a broken model", session=f"s{i}", max_tokens=4)
        kept = await asyncio.to_thread(letters, env, 4)
        assert {x.stage for x in kept} == {"inference"} and all(x.request is not None for x in kept)
        listed = dlq("list", "--since", "5m", "--stage", "inference", env=env)
        assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 4, listed.stdout + listed.stderr

        backend.mode = "ok"  # the model is back
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started - 1))
        replayed = dlq("replay", "--since", since, env=env, target=m.entry)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        assert replayed.stdout.count(": OK") == 4
        shown = [json.loads(line) for line in dlq("show", *[x.id for x in kept], env=env).stdout.splitlines()]
        assert all(x["replays"] and x["replays"][-1]["status"] == "OK" for x in shown), shown
        # Each replay is a new request whose edge span links to the original's.
        for x in kept:
            replay_id = next(s for s in shown if s["id"] == x.id)["replays"][-1]["request_id"]
            assert replay_id != x.request_id

            def linked(x: DeadLetter = x, replay_id: str = replay_id) -> bool:
                spans = [
                    s
                    for s in receiver.snapshot()
                    if s.service == "stream" and s.attributes.get("orchestrator.request_id") == replay_id
                ]
                return bool(spans) and spans[0].links == [(x.trace_id, x.span_id)]

            poll(linked, timeout_s=15, what="the replay's span linked to the original")
        # The store survives an edge restart.
        m.kill("stream")
        m.restart("stream")
        assert len(dlq("list", env=env).stdout.splitlines()) == 4
        assert dlq("purge", "--status", "INTERNAL", env=env).returncode in (0, 1)
    finally:
        backend.stop()


def test_replaying_a_letter_whose_request_was_not_kept_says_why(tmp_path: Path) -> None:
    env = {"ORCH_DLQ_STORE": "sqlite", "ORCH_DLQ_PATH": str(tmp_path / "dl.db")}
    from orchestrator.runtime.deadletters import SqliteStore, new_letter_id

    store = SqliteStore(tmp_path / "dl.db", 10, 3600)
    letter = DeadLetter(new_letter_id(), "r1", "s", "inference", "UNAVAILABLE", "gone", time.time(), 1.0, 0)
    asyncio.run(store.put([letter]))
    asyncio.run(store.close())
    done = dlq("replay", letter.id, env=env, target="127.0.0.1:1")
    assert done.returncode == 1 and "its request was not kept" in done.stdout
    refused = dlq("purge", env=env)  # no ids, no filter: refused, nothing purged
    assert refused.returncode == 2 and "needs ids, a filter or --all" in refused.stderr
    assert "1 dead letter(s)" in dlq("list", env=env).stderr
