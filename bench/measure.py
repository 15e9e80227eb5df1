"""Measurement: load runs against a target, their summaries (latency, throughput, sheds, CPU) and ratios."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import Any

from bench import procstats
from bench.loadgen import RunResult, Sample, closed_loop, joined, open_loop
from bench.targets import Target


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(
    scenario: str,
    target: Target,
    result: RunResult,
    *,
    mode: str,
    tokens: int,
    concurrency: int = 0,
    rate: float = 0.0,
    cpu_s: float = 0.0,
) -> dict[str, Any]:
    sent = result.started_in_window()
    ok = [s for s in sent if s.outcome == "ok"]
    shed = [s for s in sent if s.outcome == "shed"]
    limited = [s for s in sent if s.outcome == "rate_limited"]
    done_ok = [s for s in result.completed_in_window() if s.outcome == "ok"]
    ttfc = [s.ttfc_s for s in ok if s.ttfc_s is not None]
    total = [s.total_s for s in ok]
    return {
        "scenario": scenario,
        "target": target.name,
        "mode": mode,
        "concurrency": concurrency,
        "offered_rps": rate,
        "tokens": tokens,
        "window_s": round(result.window_s, 3),
        "requests": len(sent),
        "ok": len(ok),
        "shed": len(shed),
        "rate_limited": len(limited),
        "errors": len(sent) - len(ok) - len(shed) - len(limited),
        "rps": round(len(done_ok) / result.window_s, 2),
        "tokens_per_s": round(sum(s.tokens for s in done_ok) / result.window_s, 1),
        "messages_per_s": round(sum(s.messages for s in done_ok) / result.window_s, 1),
        "shed_rate": round(len(shed) / max(1, len(sent)), 4),
        "ttfc_ms": {q: ms(pct(ttfc, q)) for q in (50, 90, 99)} | {"max": ms(max(ttfc, default=None))},
        "total_ms": {q: ms(pct(total, q)) for q in (50, 90, 99)} | {"max": ms(max(total, default=None))},
        "shed_reply_ms": {q: ms(pct([s.total_s for s in shed], q)) for q in (50, 99)},
        "queue_wait_ms": {q: ms(pct([s.queue_s for s in ok], q)) for q in (50, 99)},
        "cpu_ms_per_request": round(cpu_s * 1000 / max(1, len(done_ok)), 3) if cpu_s else None,
    }


def cpu_total(pids: dict[str, int]) -> float:
    return sum(procstats.cpu_seconds(pid) for pid in pids.values())


async def _with_cpu(target: Target, run: Awaitable[RunResult]) -> tuple[RunResult, float]:
    """``run``'s result and the CPU seconds ``target``'s processes spent in its measurement window
    (their CPU over the whole run, warm-up included, scaled to the window)."""
    before, started = cpu_total(target.pids), time.perf_counter()
    result = await run
    spent = cpu_total(target.pids) - before
    return result, spent * result.window_s / max(1e-9, time.perf_counter() - started)


async def measure(
    scenario: str,
    target: Target,
    *,
    tokens: int,
    duration_s: float,
    warmup_s: float,
    concurrency: int = 0,
    rate: float = 0.0,
) -> dict[str, Any]:
    submit = target.submit(tokens)
    mode = "open" if rate else "closed"
    label = f"{scenario}: {target.name} N={tokens} " + (f"{rate:.0f}/s" if rate else f"C={concurrency}")
    load = (
        open_loop(submit, rate, duration_s, warmup_s, label)
        if rate
        else closed_loop(submit, concurrency, duration_s, warmup_s, label)
    )
    result, cpu_s = await _with_cpu(target, load)
    return summarize(
        scenario, target, result, mode=mode, tokens=tokens, concurrency=concurrency, rate=rate, cpu_s=cpu_s
    ) | {"samples": [_sample_row(s) for s in result.started_in_window()]}


async def measure_in_turns(
    scenario: str, targets: Sequence[Target], *, tokens: int, duration_s: float, warmup_s: float, turns: int = 8
) -> list[dict[str, Any]]:
    """One request at a time (C=1) to each target, the targets taking turns in ``turns`` blocks: each block
    is a warm closed loop like ``measure``'s, and a slow or fast spell of the machine falls on every target
    alike instead of on whichever was measured then. What unloaded latency ratios need on a shared machine."""
    blocks: dict[str, list[RunResult]] = {t.name: [] for t in targets}
    cpu = dict.fromkeys(blocks, 0.0)
    for turn in range(turns):
        for target in targets:
            label = f"{scenario}: {target.name} N={tokens} C=1 ({turn + 1}/{turns})"
            # A short warm-up per block: the target's processes were idle during the others' turns.
            warmup = warmup_s if turn == 0 else warmup_s / 10
            block, cpu_s = await _with_cpu(
                target, closed_loop(target.submit(tokens), 1, duration_s / turns, warmup, label)
            )
            cpu[target.name] += cpu_s
            blocks[target.name].append(block)
    runs = []
    for target in targets:
        result = joined(blocks[target.name])
        runs.append(
            summarize(scenario, target, result, mode="closed", tokens=tokens, concurrency=1, cpu_s=cpu[target.name])
            | {"samples": [_sample_row(s) for s in result.started_in_window()], "turns": turns}
        )
    return runs


def _sample_row(s: Sample) -> tuple[str, float | None, float]:
    return (s.outcome, s.ttfc_s, s.total_s)


def rss(target: Target) -> dict[str, dict[str, float]]:
    return {
        name: {"rss_mb": round(procstats.rss_mb(pid), 1), "peak_mb": round(procstats.peak_rss_mb(pid), 1)}
        for name, pid in target.pids.items()
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)
