"""Benchmark scenarios: the mesh against its floors, all measured in one run."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from orchestrator.bench import procstats
from orchestrator.bench.loadgen import RunResult, Sample, closed_loop, joined, open_loop
from orchestrator.core.config import load_config
from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh, start_mesh
from orchestrator.stages.local import LocalPipeline
from orchestrator.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from orchestrator_client import AsyncOrchestratorClient, build_request

SINGLE_HOP = "single-hop floor"
BARE_CHAIN = "bare chain floor"
LINK_CHAIN = "link chain floor"

# Long enough that the echo worker always has more tokens than any preset asks for.
BENCH_INPUT = "How do bounded queues and load shedding keep streaming latency low under overload? " + " ".join(
    f"word{i}" for i in range(200)
)


# -- targets -------------------------------------------------------------------------------------


class Target:
    """Something that answers PromptRequests with StreamChunks; ``pids`` are its server processes."""

    name = "target"
    pids: dict[str, int]

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop what the target started."""


class GrpcTarget(Target):
    def __init__(self, name: str, address: str, pids: dict[str, int]) -> None:
        self.name = name
        self.address = address
        self.pids = pids
        self.client = AsyncOrchestratorClient(address)

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        def one(i: int) -> AsyncIterator[types_pb2.StreamChunk]:
            return self.client.submit_request(
                build_request(BENCH_INPUT, session=f"bench-{i % 256}", max_tokens=tokens), timeout=120
            )

        return one

    async def close(self) -> None:
        await self.client.close()


class MeshTarget(GrpcTarget):
    def __init__(self, mesh: Mesh) -> None:
        super().__init__("mesh", mesh.entry, {name: p.popen.pid for name, p in mesh.stages.items()})
        self.mesh = mesh

    async def close(self) -> None:
        await super().close()
        await asyncio.to_thread(self.mesh.stop)


class HopTarget(GrpcTarget):
    """Bare grpc.aio processes: one (the single-hop floor) or a relay chain (the bare chain floor)."""

    def __init__(self, name: str, procs: list[subprocess.Popen[bytes]], address: str) -> None:
        super().__init__(name, address, {f"hop{i}": proc.pid for i, proc in enumerate(procs)})
        self.procs = procs

    async def close(self) -> None:
        await super().close()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            await asyncio.to_thread(proc.wait, 10)


class LocalTarget(Target):
    def __init__(self, env: dict[str, str]) -> None:
        self.name = "in-process floor"
        self.pipeline = LocalPipeline(load_config(env=env))
        self.pids = {"bench": os.getpid()}

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        def one(i: int) -> AsyncIterator[types_pb2.StreamChunk]:
            return self.pipeline.submit(build_request(BENCH_INPUT, session=f"bench-{i % 256}", max_tokens=tokens))

        return one


def mesh_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "OTEL_"))}
    for stage in STAGES:
        env[f"ORCH_{stage.upper()}_PORT"] = "0"
        env[f"ORCH_{stage.upper()}_METRICS_PORT"] = "-1"
    env["ORCH_SERVER_LOG_LEVEL"] = "WARNING"
    env.update(extra)
    return env


async def start_mesh_target(run_dir: Path, extra: dict[str, str]) -> MeshTarget:
    mesh = await asyncio.to_thread(start_mesh, run_dir, env=mesh_env(extra), timeout_s=60)
    return MeshTarget(mesh)


async def _start_hop_process(
    run_dir: Path, next_address: str | None, links: bool, loop: str
) -> tuple[subprocess.Popen[bytes], str]:
    ready = Path(tempfile.mkdtemp(dir=run_dir)) / "hop.ready"
    argv = [sys.executable, "-m", "orchestrator.bench.hop", "--ready-file", str(ready), "--event-loop", loop]
    if next_address:
        argv += ["--next", next_address]
    if links:
        argv.append("--links")
    proc = await asyncio.to_thread(subprocess.Popen, argv)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("a floor server did not start")
        await asyncio.sleep(0.02)
    address = json.loads(ready.read_text())["address"]
    # The hop server has no health service: a channel that connects is enough.
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
    return proc, address


async def start_hop(run_dir: Path, processes: int = 1, stage_links: bool = False) -> HopTarget:
    """The single-hop floor (one process), or a chain of ``processes`` relaying to the last one: the bare chain
    floor (a gRPC call per request per hop) or, with ``stage_links``, the link chain floor."""
    # Floors run on the same event loop as the stages, so a ratio compares like with like.
    loop = "uvloop" if load_config(env=mesh_env({})).server.uvloop else "asyncio"
    procs: list[subprocess.Popen[bytes]] = []
    address: str | None = None
    try:
        for _ in range(processes):
            proc, address = await _start_hop_process(run_dir, address, stage_links, loop)
            procs.append(proc)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    assert address is not None
    name = SINGLE_HOP if processes == 1 else (LINK_CHAIN if stage_links else BARE_CHAIN)
    return HopTarget(name, procs, address)


# -- summaries -----------------------------------------------------------------------------------


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
        "errors": len(sent) - len(ok) - len(shed),
        "rps": round(len(done_ok) / result.window_s, 2),
        "tokens_per_s": round(sum(s.tokens for s in done_ok) / result.window_s, 1),
        "shed_rate": round(len(shed) / max(1, len(sent)), 4),
        "ttfc_ms": {q: ms(pct(ttfc, q)) for q in (50, 90, 99)} | {"max": ms(max(ttfc, default=None))},
        "total_ms": {q: ms(pct(total, q)) for q in (50, 90, 99)} | {"max": ms(max(total, default=None))},
        "shed_reply_ms": {q: ms(pct([s.total_s for s in shed], q)) for q in (50, 99)},
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


# -- scenarios -----------------------------------------------------------------------------------


@dataclass
class Context:
    run_dir: Path
    scale: float  # duration multiplier: 1 for `make bench`, more for bench-full
    runs: list[dict[str, Any]] = field(default_factory=list)
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def d(self, seconds: float) -> float:
        return seconds * self.scale

    def target(self, key: str, name: str, value: float | None, limit: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        self.ratios[key] = {
            "name": name,
            "value": value,
            "target": limit,
            "higher_is_better": higher_is_better,
            "met": met,
        }


def _floors_of_the_shape(
    ctx: Context,
    key: str,
    name: str,
    mesh: float | None,
    chain: float | None,
    hop: float | None,
    link_chain: float | None = None,
) -> None:
    """What the call shape alone costs: the chains against the single hop, and the mesh against the bare chain."""
    ctx.extra.setdefault("shape", {})[key] = {
        "name": name,
        "mesh_over_hop": ratio(mesh, hop),
        "chain_over_hop": ratio(chain, hop),
        "link_chain_over_hop": ratio(link_chain, hop),
        "mesh_over_chain": ratio(mesh, chain),
    }


async def scenario_latency(ctx: Context) -> None:
    hop = await start_hop(ctx.run_dir)
    chain = await start_hop(ctx.run_dir, processes=len(STAGES))
    link_chain = await start_hop(ctx.run_dir, processes=len(STAGES), stage_links=True)
    mesh = await start_mesh_target(ctx.run_dir / "latency", {})
    ctx.extra["idle_rss_mb"] = {k: v["rss_mb"] for k, v in rss(mesh).items()}
    try:
        for tokens in (1, 128):
            ctx.runs += await measure_in_turns(
                "latency", (hop, chain, link_chain, mesh), tokens=tokens, duration_s=ctx.d(4), warmup_s=1
            )
    finally:
        await mesh.close()
        await link_chain.close()
        await chain.close()
        await hop.close()
    by = {(r["target"], r["tokens"]): r["ttfc_ms"][50] for r in ctx.runs if r["scenario"] == "latency"}
    ctx.target(
        "latency_ttfc_n1",
        "time to first chunk p50, N=1, C=1: mesh / single hop",
        ratio(by[("mesh", 1)], by[(SINGLE_HOP, 1)]),
        5.0,
        False,
    )
    _floors_of_the_shape(
        ctx,
        "ttfc_n1",
        "time to first chunk p50, N=1, C=1",
        by[("mesh", 1)],
        by[(BARE_CHAIN, 1)],
        by[(SINGLE_HOP, 1)],
        by[(LINK_CHAIN, 1)],
    )
    idle = ctx.extra["idle_rss_mb"]
    ctx.target("idle_rss", "idle RSS of the largest stage process (MB)", max(idle.values()), 50.0, False)


async def scenario_throughput(ctx: Context) -> None:
    hop = await start_hop(ctx.run_dir)
    chain = await start_hop(ctx.run_dir, processes=len(STAGES))
    mesh = await start_mesh_target(ctx.run_dir / "throughput", {})
    try:
        for tokens in (1, 16, 128):
            for concurrency in (16, 64):
                # The bare chain only where a target is judged: it costs as long as the others.
                targets = (hop, chain, mesh) if concurrency == 64 and tokens != 16 else (hop, mesh)
                for target in targets:
                    ctx.runs.append(
                        await measure(
                            "throughput",
                            target,
                            tokens=tokens,
                            concurrency=concurrency,
                            duration_s=ctx.d(4),
                            warmup_s=1,
                        )
                    )
        ctx.extra["throughput_peak_rss_mb"] = rss(mesh)
    finally:
        await mesh.close()
        await chain.close()
        await hop.close()
    by = {(r["target"], r["tokens"], r["concurrency"]): r for r in ctx.runs if r["scenario"] == "throughput"}
    rps = {t: by[(t, 1, 64)]["rps"] for t in ("mesh", BARE_CHAIN, SINGLE_HOP)}
    tps = {t: by[(t, 128, 64)]["tokens_per_s"] for t in ("mesh", BARE_CHAIN, SINGLE_HOP)}
    ctx.target(
        "throughput_n1_c64", "requests/s, N=1, C=64: mesh / single hop", ratio(rps["mesh"], rps[SINGLE_HOP]), 0.2, True
    )
    ctx.target(
        "relay_n128_c64",
        "tokens/s, N=128, C=64: mesh / single hop (one token per message)",
        ratio(tps["mesh"], tps[SINGLE_HOP]),
        2.0,
        True,
    )
    _floors_of_the_shape(ctx, "rps_n1_c64", "requests/s, N=1, C=64", rps["mesh"], rps[BARE_CHAIN], rps[SINGLE_HOP])
    _floors_of_the_shape(ctx, "tps_n128_c64", "tokens/s, N=128, C=64", tps["mesh"], tps[BARE_CHAIN], tps[SINGLE_HOP])


MODEL_BOUND = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20", "ORCH_INFERENCE_WORKER_ECHO_TTFT_MS": "20"}


async def scenario_model_bound(ctx: Context) -> None:
    local = LocalTarget(mesh_env(MODEL_BOUND))
    ctx.runs.append(await measure("model-bound", local, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2))
    mesh = await start_mesh_target(ctx.run_dir / "model-bound", MODEL_BOUND)
    try:
        ctx.runs.append(await measure("model-bound", mesh, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2))
    finally:
        await mesh.close()
    by = {r["target"]: r for r in ctx.runs if r["scenario"] == "model-bound"}
    ctx.target(
        "model_bound",
        "tokens/s at 20 ms/token, N=32, C=64: mesh / in-process",
        ratio(by["mesh"]["tokens_per_s"], by["in-process floor"]["tokens_per_s"]),
        0.95,
        True,
    )


OVERLOAD = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "5", "ORCH_INFERENCE_CONCURRENCY": "16"}


async def scenario_overload(ctx: Context) -> None:
    mesh = await start_mesh_target(ctx.run_dir / "overload", OVERLOAD)
    rss_after: list[dict[str, dict[str, float]]] = []
    try:
        # Capacity: a closed loop deep enough to keep every worker slot busy.
        peak = await measure("overload", mesh, tokens=16, concurrency=128, duration_s=ctx.d(4), warmup_s=1)
        ctx.runs.append(peak)
        # The 4x step runs twice: memory that grows again the second time is a leak, not a working set.
        for factor in (1, 2, 4, 4):
            run = await measure("overload", mesh, tokens=16, rate=peak["rps"] * factor, duration_s=ctx.d(5), warmup_s=1)
            run["load_factor"] = factor
            ctx.runs.append(run)
            # Let the queues drain between steps so each step starts from the same state.
            await asyncio.sleep(2)
            rss_after.append(rss(mesh))
    finally:
        await mesh.close()
    first, second = rss_after[-2], rss_after[-1]
    growth = max(second[s]["rss_mb"] - first[s]["rss_mb"] for s in first)
    ctx.extra["overload_rss_mb"] = {"after_first_4x": first, "after_second_4x": second}
    ctx.extra["overload_rss_growth_mb"] = round(growth, 1)
    steps = [r for r in ctx.runs if r["scenario"] == "overload"]
    at4 = next(r for r in steps if r.get("load_factor") == 4)
    best = max(r["rps"] for r in steps)
    ctx.target("overload_goodput", "goodput at 4x capacity / peak throughput", ratio(at4["rps"], best), 0.9, True)
    ctx.target("overload_shed_p99", "shed reply p99 at 4x capacity (ms)", at4["shed_reply_ms"][99], 5.0, False)
    ctx.target(
        "overload_rss",
        "RSS growth of the largest stage from one 4x step to the next (MB)",
        round(growth, 1),
        5.0,
        False,
    )


async def scenario_cancel(ctx: Context) -> None:
    mesh = await start_mesh_target(ctx.run_dir / "cancel", {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "5"})
    stops: list[float] = []
    inference = mesh.mesh.address("inference")
    try:
        async with grpc.aio.insecure_channel(inference) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            trials = int(30 * ctx.scale)
            for i in range(trials):
                stream = mesh.client.submit_request(build_request(BENCH_INPUT, session=f"c{i}", max_tokens=200))
                for _ in range(4):
                    await anext(stream)
                cancelled_at = time.time_ns()
                await stream.aclose()
                deadline = time.monotonic() + 5
                while True:
                    status = await admin.GetStatus(admin_pb2.GetStatusRequest())
                    if status.worker.active == 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the worker did not stop within 5 s of a cancel")
                    await asyncio.sleep(0.001)
                stops.append((status.worker.last_generation_end_unix_nanos - cancelled_at) / 1e6)
                if sys.stderr.isatty() or i + 1 == trials:
                    sys.stderr.write(f"\rcancel: {i + 1}/{trials} trials" + ("\n" if i + 1 == trials else ""))
    finally:
        await mesh.close()
    ctx.extra["cancel_stop_ms"] = {
        "trials": len(stops),
        "p50": round(statistics.median(stops), 3),
        "p99": round(pct(stops, 99) or 0, 3),
        "max": round(max(stops), 3),
    }
    ctx.target(
        "cancel_p99", "worker stops after a client cancel, p99 (ms)", ctx.extra["cancel_stop_ms"]["p99"], 5.0, False
    )


async def scenario_tracing(ctx: Context) -> None:
    from orchestrator.bench.otlp_sink import OtlpSink

    sink = OtlpSink().start()
    try:
        settings = {
            "off": {},
            "on, 100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
            "on, 1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
        }
        rps: dict[str, float] = {}
        for label, otel in settings.items():
            env = dict(otel)
            if otel:
                env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
            mesh = await start_mesh_target(ctx.run_dir / f"tracing-{len(rps)}", env)
            mesh.name = f"mesh, tracing {label}"
            try:
                run = await measure("tracing", mesh, tokens=16, concurrency=16, duration_s=ctx.d(5), warmup_s=1)
            finally:
                await mesh.close()
            ctx.runs.append(run)
            rps[label] = run["rps"]
        ctx.extra["tracing"] = {
            "spans_received": sink.count,
            "rps": rps,
            "ratio_on_100": ratio(rps["on, 100%"], rps["off"]),
            "ratio_on_1": ratio(rps["on, 1%"], rps["off"]),
        }
    finally:
        sink.stop()


async def scenario_coalescing(ctx: Context) -> None:
    """What coalescing buys: the token relay (N=128, C=64) at 1, 8 and 32 tokens per message."""
    gains: dict[int, float] = {}
    for k in (1, 8, 32):
        mesh = await start_mesh_target(ctx.run_dir / f"coalesce-{k}", {"ORCH_INFERENCE_COALESCE_TOKENS": str(k)})
        mesh.name = f"mesh, {k} tokens/message"
        try:
            run = await measure("coalescing", mesh, tokens=128, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
        finally:
            await mesh.close()
        ctx.runs.append(run)
        gains[k] = run["tokens_per_s"]
    ctx.extra["coalescing_tokens_per_s"] = gains


async def scenario_transport(ctx: Context) -> None:
    """What stage links buy: the same mesh with one gRPC call per request per hop instead."""
    rps: dict[str, dict[int, float]] = {}
    for links in ("true", "false"):
        mesh = await start_mesh_target(ctx.run_dir / f"links-{links}", {"ORCH_SERVER_STAGE_LINKS": links})
        mesh.name = "mesh, stage links" if links == "true" else "mesh, a call per request per hop"
        try:
            for tokens in (1, 128):
                run = await measure("transport", mesh, tokens=tokens, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
                ctx.runs.append(run)
                rps.setdefault(mesh.name, {})[tokens] = run["rps"]
        finally:
            await mesh.close()
    links_rps, calls_rps = rps["mesh, stage links"], rps["mesh, a call per request per hop"]
    ctx.extra["transport"] = {
        "rps": rps,
        "links_over_calls": {n: ratio(links_rps[n], calls_rps[n]) for n in (1, 128)},
    }


SCENARIOS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "model-bound": scenario_model_bound,
    "overload": scenario_overload,
    "cancel": scenario_cancel,
    "tracing": scenario_tracing,
    "coalescing": scenario_coalescing,
    "transport": scenario_transport,
}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "system": platform.platform()}


async def run_suite(names: list[str], scale: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orchestrator-bench-") as tmp:
        ctx = Context(Path(tmp), scale)
        started = time.time()
        for name in names:
            await SCENARIOS[name](ctx)
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "machine": machine(),
        "scenarios": names,
        "scale": scale,
        "targets": ctx.ratios,
        "extra": ctx.extra,
        "runs": ctx.runs,
    }
    return results


def write_json(results: dict[str, Any], path: Path) -> None:
    """The results without per-request samples."""
    slim = dict(results, runs=[{k: v for k, v in r.items() if k != "samples"} for r in results["runs"]])
    path.write_text(json.dumps(slim, indent=2))
