"""The edge's dead-letter writer and the choice of store (``dlq.store``): see ``runtime/deadletters.py``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from orchestrator.core.config import DlqConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.deadletters import DeadLetter, SqliteStore, Store, default_path
from orchestrator.runtime.deadletters_nats import NatsStore

log = logging.getLogger(__name__)


def open_store(cfg: DlqConfig) -> Store | None:
    """The configured store (None: dead letters are off). Raises OSError / ConnectionError when it cannot open."""
    if cfg.store == "off":
        return None
    if cfg.store == "nats":
        return NatsStore(cfg.nats_url, cfg.nats_stream, cfg.max_letters, cfg.max_age_s)
    return SqliteStore(cfg.path or default_path(), cfg.max_letters, cfg.max_age_s)


class DeadLetters:
    """The edge's writer: ``record`` puts a letter on a bounded queue and returns at once; a task writes batches to
    the store. A full queue or a failing store is counted (``dead_letter_errors_total``) and logged, never raised."""

    BATCH = 256
    LINGER_S = 0.1

    def __init__(self, cfg: DlqConfig, stage: str, telemetry: Telemetry) -> None:
        self.cfg = cfg
        self.stage = stage
        self._telemetry = telemetry
        self._queue: asyncio.Queue[DeadLetter] = asyncio.Queue(cfg.queue)
        self._store: Store | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_error_log = 0.0
        self.written = 0

    def record(self, letter: DeadLetter) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._write())
        try:
            self._queue.put_nowait(letter)
        except asyncio.QueueFull:
            self._error("queue_full", "the dead-letter queue is full; a letter was dropped")

    def _error(self, kind: str, what: str) -> None:
        self._telemetry.record_dead_letter_error(kind)
        now = time.monotonic()
        if now - self._last_error_log >= 1.0:  # a store that is down fails every write: a line a second
            self._last_error_log = now
            log.error("stage=%s %s", self.stage, what)

    async def _write(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Letters come in bursts when something fails: wait a moment for the rest, one write for them all.
            await asyncio.sleep(self.LINGER_S)
            while len(batch) < self.BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                if self._store is None:
                    self._store = open_store(self.cfg)
                assert self._store is not None
                before = self._store.dropped
                await self._store.put(batch)
                self.written += len(batch)
                for letter in batch:
                    self._telemetry.record_dead_letter(letter.stage, letter.status)
                self._telemetry.record_dead_letters_dropped(self._store.dropped - before)
                self._telemetry.record_dead_letter_store_size(await self._store.size())
            except Exception as exc:  # a store that is down or full: counted, logged, the letters lost
                self._error("store", f"{len(batch)} dead letter(s) not written: {type(exc).__name__}: {exc}")
                if self._store is not None:
                    with contextlib.suppress(Exception):
                        await self._store.close()
                    self._store = None
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) until every letter recorded is written (or lost): at shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._store is not None:
            await self._store.close()
