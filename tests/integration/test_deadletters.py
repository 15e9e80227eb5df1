"""The dead-letter stores, one suite for both: a real SQLite file and a real nats-server (JetStream)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.runtime.deadletters import DeadLetter, Filter, SqliteStore, Store, new_letter_id
from orchestrator.runtime.deadletters_nats import NatsStore
from tests.natsserver import nats_server

SECRET = "purple-elephant-7741"  # stands for prompt text: it must never be stored unless asked


def letter(
    n: int, *, stage: str = "inference", status: str = "UNAVAILABLE", request: bytes | None = None
) -> DeadLetter:
    return DeadLetter(
        id=new_letter_id(),
        request_id=f"r{n}",
        session=f"s{n % 3}",
        stage=stage,
        status=status,
        message="inference stage is unavailable",
        at=time.time() + n * 0.001,
        duration_ms=12.5,
        tokens_streamed=n,
        request=request,
    )


@pytest.fixture(params=["sqlite", "nats"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, Store, Path]]:
    if request.param == "sqlite":
        s: Store = SqliteStore(tmp_path / "dl.db", max_letters=5, max_age_s=3600)
        yield "sqlite", s, tmp_path
        await s.close()
        return
    with nats_server(tmp_path / "nats") as url:
        s = NatsStore(url, "TEST_DLQ", max_letters=5, max_age_s=3600)
        yield "nats", s, tmp_path
        await s.close()


async def test_letters_are_kept_filtered_and_replays_recorded(store: tuple[str, Store, Path]) -> None:
    _, s, _ = store
    letters = [letter(1), letter(2, stage="post", status="INTERNAL"), letter(3)]
    await s.put(letters)
    assert [x.request_id for x in await s.list(Filter())] == ["r1", "r2", "r3"]
    assert [x.request_id for x in await s.list(Filter(stage="inference"))] == ["r1", "r3"]
    assert [x.request_id for x in await s.list(Filter(status="INTERNAL"))] == ["r2"]
    assert [x.request_id for x in await s.list(Filter(since=letters[2].at))] == ["r3"]
    await s.record_replay(letters[0].id, {"request_id": "r1-replay", "status": "OK", "at": time.time()})
    (first,) = await s.list(Filter(ids=[letters[0].id]))
    assert first.replays[0]["request_id"] == "r1-replay" and first.tokens_streamed == 1
    assert await s.purge(Filter(stage="post")) == 1
    assert await s.size() == 2


async def test_the_bound_drops_the_oldest_and_counts_them(store: tuple[str, Store, Path]) -> None:
    _, s, _ = store
    for n in range(8):
        await s.put([letter(n)])
    kept = [x.request_id for x in await s.list(Filter())]
    assert kept == ["r3", "r4", "r5", "r6", "r7"]
    assert s.dropped == 3


async def test_no_prompt_text_is_stored_unless_asked(store: tuple[str, Store, Path]) -> None:
    kind, s, where = store
    from orchestrator_client import build_request

    await s.put([letter(1)])  # without the request: ids, stage, status, timings
    kept = build_request(f"keep this {SECRET}", session="s").SerializeToString()
    await s.put([letter(2, request=kept)])
    (with_request,) = await s.list(Filter(ids=[(await s.list(Filter()))[-1].id]))
    assert with_request.request == kept
    await s.purge(Filter(ids=[with_request.id]))
    if kind == "sqlite":
        await s.close()  # the WAL folded into the file
    files = [p for p in where.rglob("*") if p.is_file() and not p.name.endswith(".log")]
    assert files and not any(SECRET.encode() in p.read_bytes() for p in files if "nats" not in p.parts), files


async def test_a_reopened_store_has_its_letters(store: tuple[str, Store, Path]) -> None:
    kind, s, where = store
    await s.put([letter(1), letter(2)])
    await s.close()
    again: Store = (
        SqliteStore(where / "dl.db", max_letters=5, max_age_s=3600)
        if kind == "sqlite"
        else NatsStore(s.url, "TEST_DLQ", 5, 3600)  # type: ignore[attr-defined]
    )
    try:
        assert [x.request_id for x in await again.list(Filter())] == ["r1", "r2"]
    finally:
        await again.close()


def test_a_new_sqlite_file_is_owner_only(tmp_path: Path) -> None:
    SqliteStore(tmp_path / "new.db", 10, 60)
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o600
