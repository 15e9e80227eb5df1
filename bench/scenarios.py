"""Benchmark scenarios: the mesh against its floors, all measured in one run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.measure import measure, measure_in_turns, ms, pct, ratio, rss
from bench.retrieval import labeled_set
from bench.targets import (
    BARE_CHAIN,
    BENCH_INPUT,
    LINK_CHAIN,
    SHED_FLOOR,
    SINGLE_HOP,
    LocalTarget,
    MeshTarget,
    mesh_env,
    mesh_running,
    start_hop,
    start_mesh_target,
    start_shed_floor,
)
from orchestrator.core.graph import STAGES
from orchestrator.retrieval import index
from orchestrator.retrieval.embeddings import OnnxEmbedder, load_embedder
from orchestrator.retrieval.index import VectorIndex
from orchestrator.retrieval.search import MODES, Retriever
from orchestrator.runtime.tenants import key_line, new_key
from orchestrator.v1 import admin_pb2, admin_pb2_grpc, stages_pb2_grpc
from orchestrator_client import build_request, tls_credentials


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
    # The RAG stage also holds its retrieval: numpy and the BM25 weights here (~11 MB), the embedding model in the
    # hybrid and dense modes (~250 MB). Its figure is reported beside the others; the target is the runtime's.
    runtime = [v for k, v in idle.items() if k != "rag"]
    ctx.target("idle_rss", "idle RSS of the largest stage process but RAG (MB)", max(runtime), 50.0, False)


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
    # Like with like: an instant worker's 128 tokens cross each hop as one coalesced message, the single hop sends
    # 128. A worker that paces its tokens makes several messages per request cross each hop: messages/s per hop.
    async with mesh_running(ctx.run_dir / "relay-paced", PACED, "mesh, paced worker") as paced:
        run = await measure("throughput", paced, tokens=128, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
    ctx.runs.append(run)
    ctx.extra["relay"] = {
        "paced_tokens_per_s": run["tokens_per_s"],
        "paced_messages_per_s": run["messages_per_s"],
        "tokens_per_message": ratio(run["tokens_per_s"], run["messages_per_s"]),
        "single_hop_messages_per_s": by[(SINGLE_HOP, 128, 64)]["messages_per_s"],
        "messages_over_single_hop": ratio(run["messages_per_s"], by[(SINGLE_HOP, 128, 64)]["messages_per_s"]),
    }
    _floors_of_the_shape(ctx, "tps_n128_c64", "tokens/s, N=128, C=64", tps["mesh"], tps[BARE_CHAIN], tps[SINGLE_HOP])


MODEL_BOUND = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20", "ORCH_INFERENCE_WORKER_ECHO_TTFT_MS": "20"}
# A worker fast enough to keep the relay busy, paced so that a 128-token answer crosses each hop as many messages.
PACED = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "1"}


async def scenario_model_bound(ctx: Context) -> None:
    local = LocalTarget(mesh_env(MODEL_BOUND))
    ctx.runs.append(await measure("model-bound", local, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2))
    async with mesh_running(ctx.run_dir / "model-bound", MODEL_BOUND) as mesh:
        ctx.runs.append(await measure("model-bound", mesh, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2))
    by = {r["target"]: r for r in ctx.runs if r["scenario"] == "model-bound"}
    ctx.target(
        "model_bound",
        "tokens/s at 20 ms/token, N=32, C=64: mesh / in-process",
        ratio(by["mesh"]["tokens_per_s"], by["in-process floor"]["tokens_per_s"]),
        0.95,
        True,
    )


OVERLOAD = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "5", "ORCH_INFERENCE_CONCURRENCY": "16"}


# Each overload step's factor of the measured capacity; the 4x step runs twice: memory that grows again the second
# time is a leak, not a working set.
OVERLOAD_FACTORS = (1, 2, 4, 4, 10)
# The overload scenario runs on all cores, then with the mesh confined to one (a machine with half the CPU) and the
# load generator on the other.
PLACEMENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {"all cores": ((), ()), "one core": ((0,), (1,))}


@contextlib.contextmanager
def _pinned(cores: tuple[int, ...]) -> Iterator[None]:
    """This process (the load generator) on ``cores`` for a while; all of them when empty."""
    before = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, set(cores) & set(range(os.cpu_count() or 1)) or before)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


async def _overload_steps(ctx: Context, placement: str) -> list[dict[str, Any]]:
    mesh_cores, loadgen_cores = PLACEMENTS[placement]
    mesh = await start_mesh_target(ctx.run_dir / f"overload-{len(ctx.runs)}", OVERLOAD, mesh_cores)
    mesh.name = f"mesh, {placement}"
    floor = await start_shed_floor(ctx.run_dir)
    floor.name = f"{SHED_FLOOR}, {placement}"
    steps: list[dict[str, Any]] = []
    rss_after: list[dict[str, dict[str, float]]] = []
    try:
        with _pinned(loadgen_cores):
            # Capacity: a closed loop deep enough to keep every worker slot busy.
            peak = await measure("overload", mesh, tokens=16, concurrency=128, duration_s=ctx.d(4), warmup_s=1)
            steps.append(peak)
            for factor in OVERLOAD_FACTORS:
                rate = peak["rps"] * factor
                run = await measure("overload", mesh, tokens=16, rate=rate, duration_s=ctx.d(5), warmup_s=1)
                steps.append(run | {"load_factor": factor})
                # Let the queues drain between steps so each step starts from the same state.
                await asyncio.sleep(2)
                rss_after.append(rss(mesh))
            for factor in sorted(set(OVERLOAD_FACTORS) - {1, 2}):  # the load generator's own floor at those rates
                run = await measure(
                    "overload", floor, tokens=16, rate=peak["rps"] * factor, duration_s=ctx.d(3), warmup_s=1
                )
                steps.append(run | {"load_factor": factor})
    finally:
        await floor.close()
        await mesh.close()
    for step in steps:
        step["placement"] = placement
    if placement == "all cores":
        first, second = rss_after[-3], rss_after[-2]  # the two 4x steps
        ctx.extra["overload_rss_mb"] = {"after_first_4x": first, "after_second_4x": second}
        ctx.extra["overload_rss_growth_mb"] = round(max(second[s]["rss_mb"] - first[s]["rss_mb"] for s in first), 1)
    return steps


async def scenario_overload(ctx: Context) -> None:
    """Open-loop overload at 1-10x the measured capacity, on all cores and on one: goodput, shed replies against the
    load generator's own floor at the same rate, and how long admitted requests waited for slots."""
    for placement in PLACEMENTS:
        steps = await _overload_steps(ctx, placement)
        ctx.runs += steps
        mesh = [r for r in steps if r["target"].startswith("mesh")]
        best = max(r["rps"] for r in mesh)
        short = "" if placement == "all cores" else "_1core"
        for factor in (4, 10):
            at = next(r for r in mesh if r.get("load_factor") == factor)
            floor = next(r for r in steps if r["target"].startswith(SHED_FLOOR) and r["load_factor"] == factor)
            where = f"{factor}x capacity, {placement}"
            ctx.target(
                f"overload_goodput_{factor}x{short}", f"goodput at {where} / peak", ratio(at["rps"], best), 0.9, True
            )
            shed_p99, floor_p99 = at["shed_reply_ms"][99], floor["shed_reply_ms"][99]
            ctx.target(f"overload_shed_p99_{factor}x{short}", f"shed reply p99 at {where} (ms)", shed_p99, 5.0, False)
            ctx.target(
                f"overload_shed_floor_{factor}x{short}",
                f"shed reply p99 at {where} / the shed floor's at the same rate",
                ratio(shed_p99, floor_p99),
                3.0,
                False,
            )
            ctx.target(
                f"overload_queue_wait_{factor}x{short}",
                f"queue wait p99 of admitted requests, all stages, at {where} (ms)",
                at["queue_wait_ms"][99],
                1000.0,
                False,
            )
    ctx.target(
        "overload_rss",
        "RSS growth of the largest stage from one 4x step to the next (MB)",
        ctx.extra["overload_rss_growth_mb"],
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
    from bench.otlp_sink import OtlpSink

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
            async with mesh_running(ctx.run_dir / f"tracing-{len(rps)}", env, f"mesh, tracing {label}") as mesh:
                run = await measure("tracing", mesh, tokens=1, concurrency=64, duration_s=ctx.d(5), warmup_s=1)
            ctx.runs.append(run)
            rps[label] = run["rps"]
        ctx.extra["tracing"] = {
            "spans_received": sink.count,
            "rps": rps,
            "ratio_on_100": ratio(rps["on, 100%"], rps["off"]),
            "ratio_on_1": ratio(rps["on, 1%"], rps["off"]),
        }
        ctx.target(
            "tracing_1",
            "requests/s, N=1, C=64, tracing at 1% sampling / off",
            ctx.extra["tracing"]["ratio_on_1"],
            0.95,
            True,
        )
        ctx.target(
            "tracing_100",
            "requests/s, N=1, C=64, tracing at 100% sampling / off",
            ctx.extra["tracing"]["ratio_on_100"],
            0.75,
            True,
        )
    finally:
        sink.stop()


async def scenario_coalescing(ctx: Context) -> None:
    """What coalescing buys: the token relay (N=128, C=64) at 1, 8 and 32 tokens per message."""
    gains: dict[int, float] = {}
    for k in (1, 8, 32):
        env = {"ORCH_INFERENCE_COALESCE_TOKENS": str(k)}
        async with mesh_running(ctx.run_dir / f"coalesce-{k}", env, f"mesh, {k} tokens/message") as mesh:
            run = await measure("coalescing", mesh, tokens=128, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
        ctx.runs.append(run)
        gains[k] = run["tokens_per_s"]
    ctx.extra["coalescing_tokens_per_s"] = gains


async def scenario_transport(ctx: Context) -> None:
    """What stage links buy: the same mesh with one gRPC call per request per hop instead."""
    rps: dict[str, dict[int, float]] = {}
    for links in ("true", "false"):
        name = "mesh, stage links" if links == "true" else "mesh, a call per request per hop"
        async with mesh_running(ctx.run_dir / f"links-{links}", {"ORCH_SERVER_STAGE_LINKS": links}, name) as mesh:
            for tokens in (1, 128):
                run = await measure("transport", mesh, tokens=tokens, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
                ctx.runs.append(run)
                rps.setdefault(name, {})[tokens] = run["rps"]
    links_rps, calls_rps = rps["mesh, stage links"], rps["mesh, a call per request per hop"]
    ctx.extra["transport"] = {
        "rps": rps,
        "links_over_calls": {n: ratio(links_rps[n], calls_rps[n]) for n in (1, 128)},
    }


def _certificates(run_dir: Path) -> Path:
    """A CA and certificates for every stage and a client, made by the script the README documents."""
    certs = run_dir / "certs"
    script = Path(__file__).resolve().parents[1] / "deploy" / "tls" / "make-certs.sh"
    subprocess.run(["bash", str(script), str(certs)], check=True, capture_output=True)
    return certs


def _tls_env(certs: Path) -> dict[str, str]:
    return {
        "ORCH_TLS_CERT_FILE": f"{certs}/{{stage}}.pem",
        "ORCH_TLS_KEY_FILE": f"{certs}/{{stage}}.key",
        "ORCH_TLS_CA_FILE": f"{certs}/ca.pem",
        "ORCH_TLS_CLIENT_CA_FILE": f"{certs}/ca.pem",
    }


async def scenario_tls(ctx: Context) -> None:
    """What TLS on every hop costs: the same mesh in plaintext and with TLS at the edge (client certificates too)
    and mutual TLS between every stage, N=1 and N=128 at C=64."""
    certs = _certificates(ctx.run_dir)
    client = tls_credentials(f"{certs}/ca.pem", f"{certs}/client.pem", f"{certs}/client.key")
    rps: dict[str, dict[int, float]] = {}
    for label, env, credentials in (("plaintext", {}, None), ("TLS", _tls_env(certs), client)):
        name = f"mesh, {label}"
        async with mesh_running(ctx.run_dir / f"tls-{label}", env, name, credentials=credentials) as mesh:
            for tokens in (1, 128):
                run = await measure("tls", mesh, tokens=tokens, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
                ctx.runs.append(run)
                rps.setdefault(label, {})[tokens] = run["rps"]
    ctx.extra["tls"] = {
        "rps": rps,
        "tls_over_plaintext": {n: ratio(rps["TLS"][n], rps["plaintext"][n]) for n in rps["TLS"]},
    }
    ctx.target(
        "tls_n1_c64",
        "requests/s, N=1, C=64: TLS on every hop / plaintext",
        ratio(rps["TLS"][1], rps["plaintext"][1]),
        0.8,
        True,
    )


# Tenant B sends at its rate; tenant A at ten times its own. Both rates are well under the mesh's capacity at N=16,
# so all B can lose is what A's refused excess costs the edge.
TENANT_RATE = 40.0


async def scenario_tenants(ctx: Context) -> None:
    """One tenant offering 10x its rate against another at its rate: the other's goodput against its goodput alone,
    and the first's excess answered RATE_LIMITED."""
    keys = ctx.run_dir / "keys.jsonl"
    key_a, key_b = new_key(), new_key()
    lines = [key_line(key, tenant, rate=TENANT_RATE, burst=TENANT_RATE) for key, tenant in ((key_a, "a"), (key_b, "b"))]
    keys.write_text("".join(f"{line}\n" for line in lines))
    env = {"ORCH_AUTH_KEYS_FILE": str(keys), "ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "1"}
    async with mesh_running(ctx.run_dir / "tenants", env, "mesh, tenant b alone", token=key_b) as b:
        duration = ctx.d(6)
        alone = await measure("tenants", b, tokens=16, rate=TENANT_RATE, duration_s=duration, warmup_s=1)
        a = b.client_of("mesh, tenant a at 10x its rate", key_a)
        b.name = "mesh, tenant b beside a"
        try:
            noisy, beside = await asyncio.gather(
                measure("tenants", a, tokens=16, rate=10 * TENANT_RATE, duration_s=duration, warmup_s=1),
                measure("tenants", b, tokens=16, rate=TENANT_RATE, duration_s=duration, warmup_s=1),
            )
        finally:
            await a.close()
    ctx.runs += [alone, noisy, beside]
    ctx.extra["tenants"] = {
        "rate_per_tenant": TENANT_RATE,
        "b_alone_rps": alone["rps"],
        "b_beside_a_rps": beside["rps"],
        "a_rps": noisy["rps"],
        "a_rate_limited": noisy["rate_limited"],
        "a_sent": noisy["requests"],
    }
    ctx.target(
        "tenant_fairness",
        "goodput of a tenant at its rate beside one at 10x its own / alone",
        ratio(beside["rps"], alone["rps"]),
        0.95,
        True,
    )


# Model-bound replicas: each inference replica holds 8 generations of 32 tokens at 20 ms/token (~0.65 s each), so one
# replica serves ~12 requests/s whatever the CPU; more replicas are more slots.
# The load keeps twice the slots in flight and nothing is shed for waiting: rendezvous hashing gives one replica more
# sessions than another at any moment, and the queue evens that out instead of turning it into sheds.
SCALING_WORKER = {
    "ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20",
    "ORCH_INFERENCE_CONCURRENCY": "8",
    "ORCH_INFERENCE_MAX_QUEUE_WAIT_MS": "10000",
    "ORCH_STREAM_ADAPTIVE_LIMIT": "false",
}


async def scenario_scaling(ctx: Context) -> None:
    """Throughput against the number of replicas: model-bound inference with 1, 2 and 4 replicas (each with a fixed
    number of generation slots), and CPU-bound requests with one and two processes of every stage."""
    model: dict[int, float] = {}
    for n in (1, 2, 4):
        env = SCALING_WORKER | {"ORCH_INFERENCE_REPLICAS": str(n)}
        async with mesh_running(ctx.run_dir / f"scaling-{n}", env, f"mesh, {n} inference replica(s)") as mesh:
            run = await measure("scaling", mesh, tokens=32, concurrency=16 * n, duration_s=ctx.d(6), warmup_s=2)
        ctx.runs.append(run)
        model[n] = run["rps"]
    cpu: dict[int, float] = {}
    for n in (1, 2):
        env = {f"ORCH_{stage.upper()}_REPLICAS": str(n) for stage in STAGES if stage != "stream"}
        async with mesh_running(ctx.run_dir / f"scaling-cpu-{n}", env, f"mesh, {n} process(es) per stage") as mesh:
            run = await measure("scaling", mesh, tokens=1, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
        ctx.runs.append(run)
        cpu[n] = run["rps"]
    ctx.extra["scaling"] = {
        "model_bound_rps": model,
        "model_bound_over_linear": {n: ratio(model[n], n * model[1]) for n in model},
        "cpu_bound_rps": cpu,
        "cpu_bound_2_over_1": ratio(cpu[2], cpu[1]),
        "cpus": os.cpu_count(),
    }
    for n in (2, 4):
        ctx.target(
            f"scaling_model_bound_{n}",
            f"requests/s with {n} model-bound inference replicas / {n} x one replica's",
            ratio(model[n], n * model[1]),
            0.9,
            True,
        )


LAYOUTS = {
    "five processes": "",
    "mixed": "rag+assemble,inference,post+stream",
    "colocated": "rag+assemble+inference+post+stream",
}


async def scenario_layouts(ctx: Context) -> None:
    """The same mesh in three layouts (a process per stage; rag+assemble, inference, post+stream; all five in one)
    against the single hop: unloaded time to first chunk (in turns), requests/s at N=1, C=64, and model-bound
    tokens/s against the in-process floor."""
    hop = await start_hop(ctx.run_dir)
    meshes: list[MeshTarget] = []
    try:
        for label, layout in LAYOUTS.items():
            env = {"ORCH_SERVER_LAYOUT": layout} if layout else {}
            mesh = await start_mesh_target(ctx.run_dir / f"layout-{len(meshes)}", env)
            mesh.name = f"mesh, {label}"
            meshes.append(mesh)
        ctx.runs += await measure_in_turns("layouts", (hop, *meshes), tokens=1, duration_s=ctx.d(4), warmup_s=1)
        for target in (hop, *meshes):
            run = await measure("layouts", target, tokens=1, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
            ctx.runs.append(run)
    finally:
        for mesh in meshes:
            await mesh.close()
        await hop.close()
    runs = [r for r in ctx.runs if r["scenario"] == "layouts"]
    ttfc = {r["target"]: r["ttfc_ms"][50] for r in runs if r["concurrency"] == 1}
    rps = {r["target"]: r["rps"] for r in runs if r["concurrency"] == 64}
    local = LocalTarget(mesh_env(MODEL_BOUND))
    floor = await measure("layouts", local, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2)
    env = MODEL_BOUND | {"ORCH_SERVER_LAYOUT": LAYOUTS["colocated"]}
    async with mesh_running(ctx.run_dir / "layout-model-bound", env, "mesh, colocated, model-bound") as mesh:
        bound = await measure("layouts", mesh, tokens=32, concurrency=64, duration_s=ctx.d(6), warmup_s=2)
    ctx.runs += [floor, bound]
    per_core: dict[int, float] = {}
    for n in (1, 2):  # whole colocated pipelines behind one edge, sessions spread by rendezvous hashing
        env = {"ORCH_SERVER_LAYOUT": "rag+assemble+inference+post,stream"}
        env |= {f"ORCH_{s.upper()}_REPLICAS": str(n) for s in STAGES if s != "stream"}
        async with mesh_running(ctx.run_dir / f"per-core-{n}", env, f"mesh, {n} colocated process(es)") as mesh:
            run = await measure("layouts", mesh, tokens=1, concurrency=64, duration_s=ctx.d(4), warmup_s=1)
        ctx.runs.append(run)
        per_core[n] = run["rps"]
    ctx.extra["per_core"] = {"rps": per_core, "two_over_one": ratio(per_core[2], per_core[1])}
    ctx.extra["layouts"] = {
        label: {
            "ttfc_over_hop": ratio(ttfc[f"mesh, {label}"], ttfc[SINGLE_HOP]),
            "rps_over_hop": ratio(rps[f"mesh, {label}"], rps[SINGLE_HOP]),
        }
        for label in LAYOUTS
    }
    colocated = ctx.extra["layouts"]["colocated"]
    ctx.target(
        "layout_colocated_ttfc",
        "time to first chunk p50, N=1, C=1, all five stages in one process / single hop",
        colocated["ttfc_over_hop"],
        1.5,
        False,
    )
    ctx.target(
        "layout_colocated_rps",
        "requests/s, N=1, C=64, all five stages in one process / single hop",
        colocated["rps_over_hop"],
        0.5,
        True,
    )
    ctx.target(
        "layout_colocated_model_bound",
        "tokens/s at 20 ms/token, N=32, C=64, all five in one process / in-process floor",
        ratio(bound["tokens_per_s"], floor["tokens_per_s"]),
        0.98,
        True,
    )


# Every tenth generation fails (no retry, no breaker): a dead letter each.
FAILURE_HEAVY = {
    "ORCH_INFERENCE_WORKER_ECHO_FAIL_EVERY": "10",
    "ORCH_INFERENCE_WORKER_RETRIES": "0",
    "ORCH_INFERENCE_WORKER_BREAKER_FAILURES": "0",
}


async def scenario_deadletters(ctx: Context) -> None:
    """What keeping dead letters costs: the normal load with the SQLite store on and off, and a load where every
    tenth request fails (and becomes a letter), comparing the latency of the requests that succeed."""
    normal: dict[str, dict[str, Any]] = {}
    heavy: dict[str, dict[str, Any]] = {}
    for label in ("off", "on"):
        dlq = {"ORCH_DLQ_STORE": "sqlite", "ORCH_DLQ_PATH": str(ctx.run_dir / f"dl-{len(normal)}.db")}
        env = dlq if label == "on" else {}
        async with mesh_running(ctx.run_dir / f"dlq-{label}", env, f"mesh, dead letters {label}") as mesh:
            normal[label] = await measure(
                "deadletters", mesh, tokens=16, concurrency=64, duration_s=ctx.d(4), warmup_s=1
            )
        name = f"mesh, every tenth fails, dead letters {label}"
        async with mesh_running(ctx.run_dir / f"dlq-heavy-{label}", env | FAILURE_HEAVY, name) as mesh:
            heavy[label] = await measure(
                "deadletters", mesh, tokens=16, concurrency=16, duration_s=ctx.d(4), warmup_s=1
            )
    ctx.runs += [*normal.values(), *heavy.values()]
    ctx.extra["deadletters"] = {
        "rps_on_over_off": ratio(normal["on"]["rps"], normal["off"]["rps"]),
        "failing_share": round(heavy["on"]["errors"] / max(1, heavy["on"]["requests"]), 3),
        "ok_total_p50_ms": {k: v["total_ms"][50] for k, v in heavy.items()},
        "ok_total_p99_ms": {k: v["total_ms"][99] for k, v in heavy.items()},
    }
    ctx.target(
        "deadletters_rps",
        "requests/s, N=16, C=64, dead letters on / off",
        ctx.extra["deadletters"]["rps_on_over_off"],
        0.98,
        True,
    )
    ctx.target(
        "deadletters_heavy_p99",
        "total p99 of the requests that succeed, every tenth failing: dead letters on / off",
        ratio(heavy["on"]["total_ms"][99], heavy["off"]["total_ms"][99]),
        1.1,
        False,
    )


# The retrieval scenario's corpus and query set (WordNet, see bench/retrieval.py).
RETRIEVAL_DOCS, RETRIEVAL_QUERIES = 10_000, 1_000


def _search_quality(vectors: VectorIndex, embedder: OnnxEmbedder, queries: list[tuple[str, str]]) -> dict[str, Any]:
    """Recall@3 and in-process latency of every mode over the same index and queries."""
    out: dict[str, Any] = {}
    for mode in MODES:
        retriever = Retriever(vectors.docs, mode, vectors, embedder)
        found, took = 0, []
        for query, relevant in queries:
            t0 = time.perf_counter()
            hits = retriever.search(query, 3)
            took.append(time.perf_counter() - t0)
            found += relevant in {h.doc.id for h in hits}
        out[mode] = {
            "recall_at_3": round(found / len(queries), 4),
            "p50_ms": ms(pct(took, 50)),
            "p99_ms": ms(pct(took, 99)),
        }
    return out


async def _through_the_stage(address: str, queries: list[tuple[str, str]]) -> dict[str, Any]:
    """Each query once through the RAG stage's Retrieve, one at a time: the stage's own duration and the round trip."""
    own, trip = [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stages_pb2_grpc.RagServiceStub(channel)
        for n, (query, _) in enumerate(queries):
            t0 = time.perf_counter()
            replies = [r async for r in stub.Retrieve(build_request(query, session=f"q{n}"), timeout=10)]
            trip.append(time.perf_counter() - t0)
            own.append(replies[-1].timings[-1].duration_ms / 1000)
    return {
        "stage_p50_ms": ms(pct(own, 50)),
        "stage_p99_ms": ms(pct(own, 99)),
        "round_trip_p50_ms": ms(pct(trip, 50)),
        "round_trip_p99_ms": ms(pct(trip, 99)),
    }


async def _queries_per_s(address: str, queries: list[tuple[str, str]], concurrency: int, duration_s: float) -> float:
    """Queries a second through the RAG stage's Retrieve, ``concurrency`` callers in a closed loop."""
    done = 0
    deadline = time.perf_counter() + duration_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stages_pb2_grpc.RagServiceStub(channel)

        async def caller(start: int) -> None:
            nonlocal done
            n = start
            while time.perf_counter() < deadline:
                query = queries[n % len(queries)][0]
                async for _ in stub.Retrieve(build_request(query, session=f"t{n}"), timeout=30):
                    pass
                done += 1
                n += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started)


async def scenario_retrieval(ctx: Context) -> None:
    """Hybrid retrieval against BM25 and dense alone on a labeled WordNet set (recall@3), the RAG stage's latency on
    a 10,000-document index beside the same search in process, and how fast the index is built."""
    try:
        labeled = await asyncio.to_thread(labeled_set, RETRIEVAL_DOCS, RETRIEVAL_QUERIES)
    except FileNotFoundError as exc:
        print(f"retrieval: skipped ({exc})", file=sys.stderr)
        return
    directory = ctx.run_dir / "wordnet-index"
    t0 = time.perf_counter()  # as `orchestrator index build` does it: every core embeds
    await asyncio.to_thread(index.build, directory, labeled.docs, load_embedder(threads=os.cpu_count() or 1))
    build_s = time.perf_counter() - t0
    embedder = load_embedder()  # as the RAG stage does it (rag.embedding_threads = 1)
    vectors = index.open_index(directory, embedder)
    modes = await asyncio.to_thread(_search_quality, vectors, embedder, labeled.queries)
    name = "mesh, RAG over a 10,000-document index"
    env = {"ORCH_RAG_INDEX": str(directory), "ORCH_RAG_MODE": "hybrid"}
    async with mesh_running(ctx.run_dir / "retrieval", env, name) as mesh:
        stage = await _through_the_stage(mesh.mesh.address("rag"), labeled.queries)
        batched = await _queries_per_s(mesh.mesh.address("rag"), labeled.queries, 32, ctx.d(5))
    env |= {"ORCH_RAG_EMBEDDING_BATCH": "1"}
    async with mesh_running(ctx.run_dir / "retrieval-unbatched", env, name + ", one query a batch") as mesh:
        alone = await _queries_per_s(mesh.mesh.address("rag"), labeled.queries, 32, ctx.d(5))
    stage |= {"batched_qps_c32": round(batched, 1), "unbatched_qps_c32": round(alone, 1)}
    ctx.extra["retrieval"] = {
        "documents": len(labeled.docs),
        "queries": len(labeled.queries),
        "index_docs_per_s": round(len(labeled.docs) / build_s, 1),
        "modes": modes,
        "stage": stage,
    }
    best_alone = max(modes["bm25"]["recall_at_3"], modes["dense"]["recall_at_3"])
    ctx.target(
        "retrieval_recall",
        "recall@3, hybrid / the better of BM25 and dense alone (WordNet senses)",
        ratio(modes["hybrid"]["recall_at_3"], best_alone),
        1.0,
        True,
    )
    for q, limit in ((50, 6.0), (99, 10.0)):
        ctx.target(
            f"retrieval_p{q}",
            f"RAG stage latency p{q}, ms (hybrid, 10,000 documents, C=1)",
            stage[f"stage_p{q}_ms"],
            limit,
            False,
        )


SCENARIOS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "latency": scenario_latency,
    "throughput": scenario_throughput,
    "model-bound": scenario_model_bound,
    "overload": scenario_overload,
    "cancel": scenario_cancel,
    "tracing": scenario_tracing,
    "coalescing": scenario_coalescing,
    "transport": scenario_transport,
    "tls": scenario_tls,
    "tenants": scenario_tenants,
    "scaling": scenario_scaling,
    "layouts": scenario_layouts,
    "deadletters": scenario_deadletters,
    "retrieval": scenario_retrieval,
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
