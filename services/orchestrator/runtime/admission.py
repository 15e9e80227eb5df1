"""Bounded, non-blocking admission: a wait queue of fixed capacity in front of a concurrency limit."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from orchestrator.core.errors import Overloaded
from orchestrator.core.telemetry import Telemetry

log = logging.getLogger(__name__)

# Bounds of the retry hint sent with a shed: long enough not to hammer, short enough to matter.
MIN_RETRY_AFTER_S = 0.01
MAX_RETRY_AFTER_S = 5.0
_EWMA_WEIGHT = 0.1


@dataclass
class AdmissionStats:
    admitted: int = 0
    shed: int = 0


class Slot:
    """A held admission slot; release it exactly once (``async with`` does)."""

    __slots__ = ("_admission", "_released", "admitted_at", "queue_s")

    def __init__(self, admission: Admission, queue_s: float) -> None:
        self._admission = admission
        self._released = False
        self.queue_s = queue_s
        self.admitted_at = time.perf_counter()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(time.perf_counter() - self.admitted_at)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Admit up to ``concurrency`` requests at once and let ``capacity`` more wait.

    ``acquire`` never blocks to decide: when the wait queue is full it raises
    ``Overloaded`` at once, so a shed reaches the caller before any response message
    (which keeps it transparently retryable, gRFC A6). A waiter that is cancelled
    (caller gone, deadline passed) leaves the queue at once. Slots are handed to
    waiters in FIFO order.
    """

    def __init__(self, stage: str, capacity: int, concurrency: int, telemetry: Telemetry | None = None) -> None:
        if concurrency < 1 or capacity < 0:
            raise ValueError("concurrency must be >= 1 and capacity >= 0")
        self.stage = stage
        self.capacity = capacity
        self.concurrency = concurrency
        self.stats = AdmissionStats()
        self._telemetry = telemetry or Telemetry()
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._mean_hold_s = 0.0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> float:
        """Expected time for the queue to drain by one concurrency's worth: the shed's retry hint."""
        estimate = self._mean_hold_s * max(1, len(self._waiters)) / self.concurrency
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    async def acquire(self) -> Slot:
        if self._active < self.concurrency and not self._waiters:
            self._active += 1
            self.stats.admitted += 1
            self._telemetry.record_queue_depth(self.stage, 0)
            return Slot(self, 0.0)
        if len(self._waiters) >= self.capacity:
            self.stats.shed += 1
            self._telemetry.record_shed(self.stage, "queue_full")
            raise Overloaded(
                f"{self.stage} stage is overloaded: {self.capacity} requests already waiting "
                f"for {self.concurrency} slots",
                stage=self.stage,
                retry_after_s=self.retry_after_s(),
                metadata={"capacity": str(self.capacity), "concurrency": str(self.concurrency)},
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._telemetry.record_queue_depth(self.stage, len(self._waiters))
        started = time.perf_counter()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self._release(0.0, count=False)
            else:
                self._waiters.remove(waiter)
            raise
        self.stats.admitted += 1
        return Slot(self, time.perf_counter() - started)

    def _release(self, held_s: float, *, count: bool = True) -> None:
        if count:
            if self._mean_hold_s == 0.0:
                self._mean_hold_s = held_s  # the first sample, rather than a long climb from zero
            else:
                self._mean_hold_s += _EWMA_WEIGHT * (held_s - self._mean_hold_s)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over; _active stays the same
                self._telemetry.record_queue_depth(self.stage, len(self._waiters))
                return
        self._active -= 1
