"""Closed-loop and open-loop (Poisson) load against any stream of StreamChunks, with a progress line."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TextIO

import grpc

from orchestrator.core.errors import OrchestratorError
from orchestrator.v1 import types_pb2
from orchestrator_client import OrchestratorRpcError

Submit = Callable[[int], AsyncIterator[types_pb2.StreamChunk]]


@dataclass(frozen=True)
class Sample:
    started: float  # perf_counter() when sent
    ttfc_s: float | None  # time to first chunk
    total_s: float
    tokens: int
    outcome: str  # ok | shed | rate_limited | error
    queue_s: float = 0.0  # time waited for slots in all stages together (from the final chunk's timings)
    messages: int = 0  # stream messages received (a coalesced message carries several tokens)


async def run_one(submit: Submit, i: int) -> Sample:
    started = time.perf_counter()
    first = None
    tokens = 0
    messages = 0
    queue_s = 0.0
    outcome = "ok"
    try:
        async for chunk in submit(i):
            messages += 1
            if first is None:
                first = time.perf_counter() - started
            if chunk.HasField("completion"):
                tokens = chunk.completion.usage.completion_tokens
                queue_s = sum(t.queue_ms for t in chunk.completion.timings) / 1000
    except OrchestratorRpcError as err:
        if err.reason == "RATE_LIMITED":  # the tenant's share, not the mesh's capacity
            outcome = "rate_limited"
        else:
            outcome = "shed" if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
    except OrchestratorError as err:  # the in-process floor raises ours directly
        outcome = "shed" if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
    return Sample(started, first, time.perf_counter() - started, tokens, outcome, queue_s, messages)


@dataclass
class Progress:
    """A one-line progress display on stderr (a new line every few seconds when not a terminal)."""

    label: str
    duration_s: float
    out: TextIO = sys.stderr
    done: int = 0
    shed: int = 0
    errors: int = 0
    _started: float = field(default_factory=time.perf_counter)
    _last_line: float = 0.0

    def add(self, sample: Sample) -> None:
        self.done += 1
        self.shed += sample.outcome == "shed"
        self.errors += sample.outcome == "error"

    def show(self, final: bool = False) -> None:
        elapsed = time.perf_counter() - self._started
        tty = self.out.isatty()
        if not final and not tty and (elapsed - self._last_line < 5 or elapsed >= self.duration_s):
            return
        self._last_line = elapsed
        width = 20
        filled = min(width, int(width * elapsed / self.duration_s)) if self.duration_s else width
        line = (
            f"{self.label:<34} [{'#' * filled}{'.' * (width - filled)}] {min(elapsed, self.duration_s):5.1f}/"
            f"{self.duration_s:.0f}s  {self.done} done  {self.shed} shed  {self.errors} errors  "
            f"{self.done / max(elapsed, 1e-9):7.1f}/s"
        )
        end = "\n" if final or not tty else ""
        self.out.write(("\r" if tty else "") + line + end)
        self.out.flush()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.show()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
        self.show(final=True)


@dataclass
class RunResult:
    """Every sample, warm-up included; the measurement window is [window_start, window_end]."""

    samples: list[Sample]
    window_start: float
    window_end: float

    @property
    def window_s(self) -> float:
        return self.window_end - self.window_start

    def started_in_window(self) -> list[Sample]:
        """Samples for latency statistics: sent inside the window."""
        return [s for s in self.samples if self.window_start <= s.started <= self.window_end]

    def completed_in_window(self) -> list[Sample]:
        """Samples for throughput: finished inside the window, wherever they were sent."""
        return [s for s in self.samples if self.window_start <= s.started + s.total_s <= self.window_end]


def joined(blocks: Sequence[RunResult]) -> RunResult:
    """Blocks of one measurement taken in turns with others', as one run: each block's window laid after
    the last, with the requests that started and ended inside it."""
    samples: list[Sample] = []
    offset = 0.0
    for block in blocks:
        shift = offset - block.window_start
        samples += [
            replace(s, started=s.started + shift)
            for s in block.samples
            if block.window_start <= s.started and s.started + s.total_s <= block.window_end
        ]
        offset += block.window_s
    return RunResult(samples, 0.0, offset)


async def closed_loop(submit: Submit, concurrency: int, duration_s: float, warmup_s: float, label: str) -> RunResult:
    """``concurrency`` workers each send one request after another; samples started after warm-up count."""
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    samples: list[Sample] = []
    progress = Progress(label, warmup_s + duration_s)
    counter = iter(range(10**12))

    async def worker() -> None:
        while time.perf_counter() < end:
            sample = await run_one(submit, next(counter))
            progress.add(sample)
            samples.append(sample)

    stop = asyncio.Event()
    shower = asyncio.create_task(progress.run(stop))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stop.set()
    await shower
    return RunResult(samples, measure_from, end)


async def open_loop(
    submit: Submit, rate_per_s: float, duration_s: float, warmup_s: float, label: str, max_outstanding: int = 20000
) -> RunResult:
    """Poisson arrivals at ``rate_per_s`` regardless of how the server keeps up (sheds show as such)."""
    rng = random.Random(7)
    start = time.perf_counter()
    measure_from = start + warmup_s
    end = measure_from + duration_s
    samples: list[Sample] = []
    progress = Progress(label, warmup_s + duration_s)
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int) -> None:
        sample = await run_one(submit, i)
        progress.add(sample)
        samples.append(sample)

    stop = asyncio.Event()
    shower = asyncio.create_task(progress.run(stop))
    next_at = start
    i = 0
    while next_at < end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) < max_outstanding:
            task = asyncio.create_task(one(i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
        next_at += -math.log(1.0 - rng.random()) / rate_per_s
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    stop.set()
    await shower
    return RunResult(samples, measure_from, end)
