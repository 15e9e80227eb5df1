"""Bounded, non-blocking admission: a wait queue in front of a concurrency limit, both bounded in time.

A request is admitted while fewer than ``limit`` hold a slot, waits in FIFO order otherwise, and is shed at once
(``Overloaded``, before anything is sent, so gRPC may retry it) when the queue is full, or when the wait it can
expect (from measured slot hold times) is longer than ``max_queue_wait_s`` or than what is left of its deadline.
A waiter still queued after ``max_queue_wait_s`` is shed then. The limit is the configured concurrency, or, with a
``Limiter``, a number that follows the queueing measured below this stage and never exceeds it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import statistics
import time
from dataclasses import dataclass

from orchestrator.core.errors import Overloaded
from orchestrator.core.telemetry import Telemetry

log = logging.getLogger(__name__)

# Bounds of the retry hint sent with a shed: long enough not to hammer, short enough to matter.
MIN_RETRY_AFTER_S = 0.01
MAX_RETRY_AFTER_S = 5.0
_EWMA_WEIGHT = 0.1
_now = time.perf_counter
# Arrivals that find no free slot for longer than STANDING_AFTER_S, with no CALM_S pause between them, are
# persistent overload, not a burst: the queue is standing. Where the limit adapts (the edge), a request is then
# not queued at all: one that finds no free slot is shed at once. A burst is absorbed by the queue; a persistent
# overload is shed at once instead of queued, so what is admitted is served promptly and what is not is told so
# without waiting (the rule of CoDel and of adaptive LIFO queues). A calm second (every arrival found a free
# slot) ends it. The stages below an adaptive edge keep their queues: the few requests the edge lets in beyond
# what they serve at once wait there briefly, which keeps them busy, and that wait is the edge's signal.
STANDING_AFTER_S = 0.1
CALM_S = 1.0


@dataclass
class AdmissionStats:
    admitted: int = 0
    shed: int = 0


class Limiter:
    """A concurrency limit that follows measured queueing, in the spirit of Envoy's adaptive concurrency and
    Netflix's gradient limiters, but on queueing delay rather than whole latency.

    Each finished request reports how long it waited in the queues of the stages below (the per-stage timings
    every answer carries); a shed below counts as a long wait. Every ``window_s`` with enough samples, the
    median wait is compared with ``target_s``: above it the limit shrinks at once by the gradient
    ``target / wait`` (at most halving); at or below it, while the stage uses at least half of its limit, the
    limit grows, by a fifth when next to nothing waits below (under a quarter of the target), else by
    ``smoothing`` times its square root: quick to protect, gentle near the target. The limit stays within
    ``[min_limit, max_limit]``. Queueing, not latency,
    because a request's latency says as much about its length (tokens, model speed) as about congestion, while
    time spent waiting for a slot below is congestion alone; and a CPU-bound closed loop, where nothing waits
    for a slot, keeps its full concurrency.
    """

    def __init__(
        self,
        max_limit: int,
        *,
        min_limit: int = 4,
        target_s: float = 0.02,
        window_s: float = 0.1,
        min_samples: int = 5,
        smoothing: float = 0.3,
    ) -> None:
        self.max_limit = max_limit
        self.min_limit = min(min_limit, max_limit)
        self.target_s = target_s
        self.window_s = window_s
        self.min_samples = min_samples
        self.smoothing = smoothing
        self.limit = float(max_limit)
        self._samples: list[float] = []
        self._window_start: float | None = None

    def sample(self, queued_below_s: float, in_use: int, now: float) -> bool:
        """Note one finished request; True when the limit was updated."""
        self._samples.append(queued_below_s)
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s or len(self._samples) < self.min_samples:
            return False
        waited = statistics.median(self._samples)
        self._samples.clear()
        self._window_start = now
        if waited > self.target_s:
            new = self.limit * max(0.5, self.target_s / waited)  # at once: the queues below are growing
        elif in_use < self.limit / 2:
            return False  # not using what it has: no reason to grow
        elif waited <= self.target_s / 4:
            new = self.limit * 1.2  # nothing waits below: grow fast, back to what bursts need
        else:
            new = self.limit + self.smoothing * math.sqrt(self.limit)  # near the target: probe gently
        self.limit = min(float(self.max_limit), max(float(self.min_limit), new))
        return True


class Slot:
    """A held admission slot; release it exactly once (``async with`` does)."""

    __slots__ = ("_admission", "_released", "admitted_at", "queue_s")

    def __init__(self, admission: Admission, queue_s: float) -> None:
        self._admission = admission
        self._released = False
        self.queue_s = queue_s
        self.admitted_at = time.perf_counter()

    def release(self, queued_below_s: float | None = None) -> None:
        """Give the slot back; ``queued_below_s``: how long the request waited in the stages below (a limiter's
        sample), None when not known."""
        if not self._released:
            self._released = True
            self._admission._release(time.perf_counter() - self.admitted_at, queued_below_s)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class Admission:
    """Admit up to ``limit`` requests at once and let up to ``capacity`` more wait, none longer than
    ``max_queue_wait_s`` (see the module's docstring).

    ``acquire`` never blocks to decide: it raises ``Overloaded`` at once, so a shed reaches the caller before any
    response message (which keeps it transparently retryable, gRFC A6). A waiter that is cancelled (caller gone,
    deadline passed) leaves the queue at once. Slots are handed to waiters in FIFO order.
    """

    def __init__(
        self,
        stage: str,
        capacity: int,
        concurrency: int,
        telemetry: Telemetry | None = None,
        *,
        max_queue_wait_s: float = math.inf,
        limiter: Limiter | None = None,
    ) -> None:
        if concurrency < 1 or capacity < 0:
            raise ValueError("concurrency must be >= 1 and capacity >= 0")
        self.stage = stage
        self.capacity = capacity
        self.max_concurrency = concurrency
        self.max_queue_wait_s = max_queue_wait_s
        self.limiter = limiter
        self.stats = AdmissionStats()
        self._telemetry = telemetry or Telemetry()
        self._active = 0
        # Each waiter's future is set True when it is handed a slot, False when it waited too long.
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._mean_hold_s = 0.0
        self._congested_since = -math.inf  # since when arrivals find no free slot, without a calm pause
        self._last_congested = -math.inf  # when an arrival last found no free slot

    @property
    def concurrency(self) -> int:
        """The limit in force: the configured concurrency, or what the limiter allows now."""
        if self.limiter is None:
            return self.max_concurrency
        return max(1, int(self.limiter.limit))

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def expected_wait_s(self) -> float:
        """How long a request queued now can expect to wait: the queue ahead of it drained at the measured rate."""
        return self._mean_hold_s * (len(self._waiters) + 1) / self.concurrency

    def retry_after_s(self) -> float:
        """Expected time for the queue to drain by one concurrency's worth: the shed's retry hint."""
        estimate = self._mean_hold_s * max(1, len(self._waiters)) / self.concurrency
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    def wait_bound_s(self) -> float:
        """The longest a request queued now may wait: ``max_queue_wait_s`` while the queue absorbs a burst, none at
        all under persistent overload (see ``STANDING_AFTER_S``)."""
        if self.limiter is None:
            return self.max_queue_wait_s
        now = _now()
        standing = now - self._last_congested < CALM_S and now - self._congested_since > STANDING_AFTER_S
        return 0.0 if standing else self.max_queue_wait_s

    def _congested(self) -> None:
        """An arrival found no free slot."""
        now = _now()
        if now - self._last_congested >= CALM_S:
            self._congested_since = now
        self._last_congested = now

    def check(self, deadline_s: float | None = None) -> float:
        """Raise ``Overloaded`` if a request arriving now would be shed; admit nothing. Synchronous and cheap, so
        a shed is decided before the request costs anything else. Returns how long the request may wait in the
        queue (``wait_bound_s``; 0 when a slot is free)."""
        if self._active < self.concurrency and not self._waiters:
            return 0.0
        self._congested()
        if len(self._waiters) >= self.capacity:
            waiting = f"{self.capacity} requests already waiting for {self.concurrency} slots"
            raise self._overloaded("queue_full", waiting)
        limit = self.wait_bound_s()
        bound = limit if deadline_s is None else min(limit, deadline_s)
        expected = self.expected_wait_s()
        if expected > bound or bound <= 0:
            why = "its deadline" if deadline_s is not None and deadline_s < limit else "the bound"
            raise self._overloaded("expected_wait", f"a request would wait ~{expected * 1000:.0f} ms, over {why}")
        return limit

    async def acquire(self, deadline_s: float | None = None) -> Slot:
        """A slot, now or after waiting in the queue; ``deadline_s``: the time the caller has left."""
        if self._active < self.concurrency and not self._waiters:
            self._active += 1
            self.stats.admitted += 1
            return Slot(self, 0.0)
        bound = self.check(deadline_s)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        started = time.perf_counter()
        timer = None if math.isinf(bound) else loop.call_later(bound, self._expire, waiter)
        try:
            admitted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                # The slot was handed over just as we were cancelled: pass it on.
                self._release(0.0, None, count=False)
            else:
                self._remove(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        waited = time.perf_counter() - started
        if not admitted:
            # Raised fresh, never kept in a local: its traceback holds this frame, which holds the waiter.
            raise self._overloaded("queue_wait", f"waited {bound * 1000:.0f} ms for a slot")
        self.stats.admitted += 1
        return Slot(self, waited)

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        """A waiter queued for as long as it may leaves the queue, to be shed (still before any message)."""
        if not waiter.done():
            self._remove(waiter)
            waiter.set_result(False)

    def _remove(self, waiter: asyncio.Future[bool]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _overloaded(self, reason: str, what: str) -> Overloaded:
        """A shed: counted here, raised by the caller."""
        self.stats.shed += 1
        self._telemetry.record_shed(self.stage, reason)
        metadata = {"capacity": str(self.capacity), "concurrency": str(self.concurrency)}
        if reason != "queue_full":
            metadata["reason"] = reason
        return Overloaded(
            f"{self.stage} stage is overloaded: {what}",
            stage=self.stage,
            retry_after_s=self.retry_after_s(),
            metadata=metadata,
        )

    def _release(self, held_s: float, queued_below_s: float | None, *, count: bool = True) -> None:
        if count:
            if self._mean_hold_s == 0.0:
                self._mean_hold_s = held_s  # the first sample, rather than a long climb from zero
            else:
                self._mean_hold_s += _EWMA_WEIGHT * (held_s - self._mean_hold_s)
            limiter = self.limiter
            if limiter and queued_below_s is not None and limiter.sample(queued_below_s, self._active, _now()):
                self._telemetry.record_concurrency_limit(self.stage, self.concurrency)
        self._active -= 1
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        """Hand free slots to waiters, first come first served, up to the limit in force."""
        if not self._waiters:
            return
        while self._waiters and self._active < self.concurrency:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(True)
