"""Resilience around any worker: bounded retries before the first token, and a circuit breaker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from orchestrator.core.aio import aclose
from orchestrator.core.errors import ChannelClosed, CircuitOpen, InferenceError, OrchestratorError, Overloaded
from orchestrator.core.telemetry import Telemetry
from orchestrator.workers.base import GenerationRequest, ModelWorker

log = logging.getLogger(__name__)

# A retry never sleeps longer than this: a backend asking for more is reported to the caller instead.
MAX_RETRY_SLEEP_S = 2.0


class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures → half-open after ``open_s`` (one probe) → closed.

    ``on_change(open)`` is called on every transition into or out of the closed state.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self,
        failures: int,
        open_s: float,
        on_change: Callable[[bool], None] | None = None,
        telemetry: Telemetry | None = None,
        clock: Callable[[], float] = time.monotonic,
        stage: str = "",
    ) -> None:
        self.stage = stage  # for logs and metric labels
        self.failures = failures
        self.open_s = open_s
        self.on_change = on_change
        self.state = self.CLOSED
        self._telemetry = telemetry or Telemetry()
        self._clock = clock
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_out = False

    def _move(self, state: str) -> None:
        if state == self.state:
            return
        was_closed = self.state == self.CLOSED
        self.state = state
        log.warning("circuit breaker of the %s worker is now %s", self.stage or "model", state)
        self._telemetry.record_breaker(self.stage, state)
        if self.on_change is not None and was_closed != (state == self.CLOSED):
            self.on_change(state != self.CLOSED)

    def before(self) -> None:
        """Let a generation through, or fail it fast while the breaker is open."""
        if self.state == self.OPEN:
            remaining = self._opened_at + self.open_s - self._clock()
            if remaining > 0:
                raise CircuitOpen("model backend is failing; circuit breaker open", retry_after_s=remaining)
            self._move(self.HALF_OPEN)
        if self.state == self.HALF_OPEN:
            if self._probe_out:
                raise CircuitOpen(
                    "model backend is being probed; circuit breaker half-open", retry_after_s=min(1.0, self.open_s)
                )
            self._probe_out = True

    def success(self) -> None:
        self._consecutive = 0
        self._probe_out = False
        self._move(self.CLOSED)

    def failure(self) -> None:
        self._consecutive += 1
        self._probe_out = False
        if self.state == self.HALF_OPEN or (self.failures and self._consecutive >= self.failures):
            self._opened_at = self._clock()
            self._move(self.OPEN)

    def abandon(self) -> None:
        """The generation ended without a verdict (cancelled): free the probe slot."""
        self._probe_out = False


def is_backend_failure(err: OrchestratorError) -> bool:
    """Failures that say the backend is unhealthy (not the caller's fault, not rate limiting)."""
    return isinstance(err, ChannelClosed | InferenceError)


def is_retryable(err: OrchestratorError) -> bool:
    return isinstance(err, ChannelClosed | InferenceError | Overloaded) and not isinstance(err, CircuitOpen)


class ResilientWorker(ModelWorker):
    """Wraps a worker: retries a failed generation before its first token (never after, so no token is
    ever duplicated), and trips a circuit breaker on consecutive backend failures."""

    def __init__(
        self,
        inner: ModelWorker,
        *,
        retries: int,
        backoff_s: float,
        breaker: CircuitBreaker,
        telemetry: Telemetry | None = None,
        name: str = "",
        stage: str = "",
    ) -> None:
        self.stage = stage  # for metric labels
        self.inner = inner
        if stage and telemetry is not None:
            telemetry.init_worker(stage)
        self.name = name or inner.name
        self.retries = retries
        self.backoff_s = backoff_s
        self.breaker = breaker
        self._telemetry = telemetry or Telemetry()

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    async def _first(self, request: GenerationRequest) -> tuple[AsyncIterator[str], str | None]:
        """A generation and its first token (None if it produced none), after retries."""
        attempt = 0
        while True:
            self.breaker.before()
            tokens = self.inner.generate(request)
            try:
                return tokens, await anext(tokens)
            except StopAsyncIteration:
                return tokens, None
            except OrchestratorError as err:
                await aclose(tokens)
                if is_backend_failure(err):
                    self.breaker.failure()
                else:
                    self.breaker.abandon()
                delay = err.retry_after_s if err.retry_after_s is not None else self.backoff_s * 2**attempt
                if not is_retryable(err) or attempt >= self.retries or delay > MAX_RETRY_SLEEP_S:
                    raise
                attempt += 1
                self._telemetry.record_retry(self.stage)
                log.info(
                    "request=%s retrying the worker (%d/%d) in %.0f ms: %s",
                    request.request_id,
                    attempt,
                    self.retries,
                    delay * 1000,
                    err.message,
                )
                await asyncio.sleep(delay)
            except BaseException:
                self.breaker.abandon()
                await aclose(tokens)
                raise

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        tokens, first = await self._first(request)
        try:
            if first is not None:
                yield first
                async for token in tokens:
                    yield token
            self.breaker.success()
        except OrchestratorError as err:
            if is_backend_failure(err):
                self.breaker.failure()
            else:
                self.breaker.abandon()
            raise
        except BaseException:
            self.breaker.abandon()
            raise
        finally:
            await aclose(tokens)

    async def close(self) -> None:
        await self.inner.close()
