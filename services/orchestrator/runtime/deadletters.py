"""Dead letters: requests that failed after the edge admitted them, kept durably so an operator can list, inspect
and replay them (``orchestrator dlq``).

The edge records one when a request ends in an error or a deadline (a client that went away, a shed, a request
refused before admission are not dead letters; sheds can be made so). It holds ids, the stage and status that ended
the request, timings and how many tokens had reached the client; the request itself (input, params, metadata) only
with ``dlq.keep_request``, since it is user data. Writing never blocks or slows a request: letters go through a
bounded queue to a writer task, and a store that is down or full is counted and logged, never raised.

Stores: SQLite (one file, WAL, bounded by count and age, owner-only), or NATS JetStream when edges run on several
hosts (``runtime/deadletters_nats.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass
class DeadLetter:
    id: str
    request_id: str
    session: str
    stage: str  # the stage that ended it
    status: str  # the gRPC status name
    message: str
    at: float  # when it failed (Unix time)
    duration_ms: float
    tokens_streamed: int  # tokens that had reached the client
    tenant: str = ""
    trace_id: str = ""
    span_id: str = ""
    request: bytes | None = None  # the serialized PromptRequest, with dlq.keep_request only
    replays: list[dict[str, Any]] = field(default_factory=list)  # {request_id, status, at}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["request"] = self.request.hex() if self.request is not None else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeadLetter:
        data = dict(data)
        data["request"] = bytes.fromhex(data["request"]) if data.get("request") else None
        return cls(**data)


@dataclass(frozen=True)
class Filter:
    since: float | None = None  # Unix time
    stage: str = ""
    status: str = ""
    session: str = ""
    ids: Sequence[str] = ()

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (self.since is None or letter.at >= self.since)
            and (not self.stage or letter.stage == self.stage)
            and (not self.status or letter.status == self.status)
            and (not self.session or letter.session == self.session)
            and (not self.ids or letter.id in self.ids)
        )


class Store(Protocol):
    """Where dead letters are kept. Every method may raise on a store that is down: callers count and log."""

    dropped: int  # letters removed by the store's bounds (count, age), since this process opened it

    async def put(self, letters: Sequence[DeadLetter]) -> None: ...

    async def list(self, where: Filter) -> list[DeadLetter]: ...

    async def record_replay(self, letter_id: str, replay: dict[str, Any]) -> None: ...

    async def purge(self, where: Filter) -> int: ...

    async def size(self) -> int: ...

    async def close(self) -> None: ...


def default_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "prompt-orchestrator" / "dead-letters.db"


class SqliteStore:
    """Dead letters in one SQLite file (WAL: readers do not block the writer), bounded by count and age: the oldest
    go first, and are counted. The file is created owner-only. Calls run in a worker thread, off the event loop."""

    def __init__(self, path: str | Path, max_letters: int, max_age_s: float) -> None:
        self.path = Path(path)
        self.max_letters = max_letters
        self.max_age_s = max_age_s
        self.dropped = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():  # owner-only from the start: the letters name sessions and tenants
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS letters (id TEXT PRIMARY KEY, at REAL NOT NULL, body TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS letters_at ON letters (at)")
        self._lock = asyncio.Lock()
        # Kept up to date as letters come and go, so that neither the bound nor the size costs a count per write.
        self._count = int(self._db.execute("SELECT count(*) FROM letters").fetchone()[0])
        self._aged_at = 0.0

    async def _run(self, fn: Any, *args: Any) -> Any:
        async with self._lock:  # one statement at a time on the one connection
            return await asyncio.to_thread(fn, *args)

    def _put(self, letters: Sequence[DeadLetter]) -> None:
        rows = [(x.id, x.at, json.dumps(x.to_json())) for x in letters]
        with contextlib.closing(self._db.cursor()) as cur:
            cur.execute("BEGIN")
            cur.executemany("INSERT OR REPLACE INTO letters (id, at, body) VALUES (?, ?, ?)", rows)
            self._count += len(rows)
            dropped = 0
            now = time.time()
            if now - self._aged_at >= 1.0:  # by age: at most once a second
                self._aged_at = now
                cur.execute("DELETE FROM letters WHERE at < ?", (now - self.max_age_s,))
                dropped += cur.rowcount
            if self._count - dropped > self.max_letters:  # by count: only when over, the oldest first
                cur.execute(
                    "DELETE FROM letters WHERE id IN (SELECT id FROM letters ORDER BY at LIMIT ?)",
                    (self._count - dropped - self.max_letters,),
                )
                dropped += cur.rowcount
            cur.execute("COMMIT")
        self._count -= dropped
        self.dropped += dropped

    async def put(self, letters: Sequence[DeadLetter]) -> None:
        await self._run(self._put, letters)

    def _all(self) -> list[DeadLetter]:
        rows = self._db.execute("SELECT body FROM letters ORDER BY at").fetchall()
        return [DeadLetter.from_json(json.loads(body)) for (body,) in rows]

    async def list(self, where: Filter) -> list[DeadLetter]:
        return [x for x in await self._run(self._all) if where.matches(x)]

    def _record_replay(self, letter_id: str, replay: dict[str, Any]) -> None:
        row = self._db.execute("SELECT body FROM letters WHERE id = ?", (letter_id,)).fetchone()
        if row is None:
            return
        letter = DeadLetter.from_json(json.loads(row[0]))
        letter.replays.append(replay)
        self._db.execute("UPDATE letters SET body = ? WHERE id = ?", (json.dumps(letter.to_json()), letter_id))

    async def record_replay(self, letter_id: str, replay: dict[str, Any]) -> None:
        await self._run(self._record_replay, letter_id, replay)

    async def purge(self, where: Filter) -> int:
        ids = [x.id for x in await self.list(where)]

        def delete() -> None:
            self._db.executemany("DELETE FROM letters WHERE id = ?", [(i,) for i in ids])
            self._count = int(self._db.execute("SELECT count(*) FROM letters").fetchone()[0])

        await self._run(delete)
        return len(ids)

    async def size(self) -> int:
        return self._count

    async def close(self) -> None:
        await self._run(self._db.close)


def new_letter_id() -> str:
    return uuid.uuid4().hex
