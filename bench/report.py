"""Bench results as a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown(results: dict[str, Any], command: str) -> str:
    m = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"`{command}` on {results['when']}: {m['cpus']} cores ({m['cpu']}), Python {m['python']}.",
        "Ratios compare the mesh with floors measured in the same run, so they hold up on a noisy machine;",
        "unloaded latency (C=1) is measured with the targets taking turns, eight blocks each.",
        "",
        "## Targets",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"].values():
        sign = ">=" if t["higher_is_better"] else "<="
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['name']} | {_fmt(t['value'])} | {sign} {_fmt(t['target'])} | {met} |")
    extra = results["extra"]
    if extra.get("shape"):
        lines += [
            "",
            "## What the call shape costs",
            "",
            "The bare chain floor is five grpc.aio processes that relay each request's bytes to the next, one",
            "call per request per hop, and the answers' bytes back, with no logic at all: what that call shape",
            "costs by itself on this machine. Where it misses a target, no work inside the stages can meet it",
            "with one call per request per hop; the mesh's stage links (one multiplexed stream per hop, see",
            "ARCHITECTURE.md) are how it gets past the bare chain. The link chain floor is the same five relays",
            "calling each other over stage links: the mesh minus everything its stages do.",
            "",
            "| measure | bare chain / single hop | link chain / single hop | mesh / single hop | mesh / bare chain |",
            "|---|---|---|---|---|",
        ]
        for row in extra["shape"].values():
            lines.append(
                f"| {row['name']} | {_fmt(row['chain_over_hop'])} | {_fmt(row.get('link_chain_over_hop'))} "
                f"| {_fmt(row['mesh_over_hop'])} | {_fmt(row['mesh_over_chain'])} |"
            )
    lines += _overload_table(results["runs"])
    lines += _notes(extra) + _retrieval_notes(extra) + _memory_notes(extra)
    lines += [
        "",
        "## Runs",
        "",
        "| scenario | target | load | N | req/s | tokens/s | first chunk p50 / p99 ms | total p50 / p99 ms "
        "| shed | shed reply p99 ms | CPU ms/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        load = f"{r['offered_rps']:.0f}/s" if r["mode"] == "open" else f"C={r['concurrency']}"
        lines.append(
            f"| {r['scenario']} | {r['target']} | {load} | {r['tokens']} | {_fmt(r['rps'])} | "
            f"{_fmt(r['tokens_per_s'])} | {_fmt(r['ttfc_ms'][50])} / {_fmt(r['ttfc_ms'][99])} | "
            f"{_fmt(r['total_ms'][50])} / {_fmt(r['total_ms'][99])} | {r['shed_rate'] * 100:.1f}% | "
            f"{_fmt(r['shed_reply_ms'][99])} | {_fmt(r['cpu_ms_per_request'])} |"
        )
    return "\n".join(lines) + "\n"


def _overload_table(runs: list[dict[str, Any]]) -> list[str]:
    """The overload steps side by side: goodput, sheds against the load generator's floor, admitted latency."""
    steps = [r for r in runs if r["scenario"] == "overload" and r["mode"] == "open" and r["target"].startswith("mesh")]
    if not steps:
        return []
    floors = {
        (r["placement"], r["load_factor"]): r["shed_reply_ms"][99]
        for r in runs
        if r["scenario"] == "overload" and r["target"].startswith("shed floor")
    }
    lines = [
        "",
        "## Overload",
        "",
        "Open-loop (Poisson) load at multiples of the capacity measured just before; the mesh on all cores, then",
        "confined to one core with the load generator on the other. The shed floor is a server that refuses every",
        "request at once, measured at the same rate: what a shed reply costs the load generator and one hop.",
        "",
        "| placement | load | offered/s | goodput/s | shed | shed reply p50 / p99 ms | shed floor p99 ms "
        "| admitted total p99 ms | queue wait p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        floor = floors.get((r["placement"], r["load_factor"]))
        lines.append(
            f"| {r['placement']} | {r['load_factor']}x | {r['offered_rps']:.0f} | {_fmt(r['rps'])} "
            f"| {r['shed_rate'] * 100:.1f}% | {_fmt(r['shed_reply_ms'][50])} / {_fmt(r['shed_reply_ms'][99])} "
            f"| {_fmt(floor)} | {_fmt(r['total_ms'][99])} "
            f"| {_fmt(r['queue_wait_ms'][50])} / {_fmt(r['queue_wait_ms'][99])} |"
        )
    return lines


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency_cdf.png (latency scenario) and overload.png (throughput and shed rate vs offered load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    latency = [r for r in results["runs"] if r["scenario"] == "latency" and r.get("samples")]
    if latency:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in latency:
            values = sorted(s[2] * 1000 for s in r["samples"] if s[0] == "ok")
            if values:
                ax.plot(
                    values, [(i + 1) / len(values) for i in range(len(values))], label=f"{r['target']}, N={r['tokens']}"
                )
        ax.set_xscale("log")
        ax.set_xlabel("request latency (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("Latency CDF, one client (C=1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / "latency_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    steps = [
        r
        for r in results["runs"]
        if r["scenario"] == "overload" and r["mode"] == "open" and r["target"].startswith("mesh")
    ]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax2 = ax.twinx()
        for placement in dict.fromkeys(r.get("placement", "") for r in steps):
            mine = sorted((r for r in steps if r.get("placement", "") == placement), key=lambda r: r["offered_rps"])
            offered = [r["offered_rps"] for r in mine]
            ax.plot(offered, [r["rps"] for r in mine], "o-", label=f"goodput, {placement} (req/s)")
            ax2.plot(offered, [r["shed_rate"] * 100 for r in mine], "s--", label=f"shed rate, {placement} (%)")
        top = max(r["offered_rps"] for r in steps)
        ax.plot([0, top], [0, top], ":", color="grey", label="offered")
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylabel("requests/s")
        ax2.set_ylabel("shed rate (%)")
        ax2.set_ylim(0, 100)
        ax.set_title("Overload: throughput and shedding vs offered load")
        ax.grid(True, alpha=0.3)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="upper left")
        path = out_dir / "overload.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _retrieval_notes(extra: dict[str, Any]) -> list[str]:
    if "retrieval" not in extra:
        return []
    r = extra["retrieval"]
    modes = "; ".join(
        f"{m} {v['recall_at_3']} (in process p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms)" for m, v in r["modes"].items()
    )
    st = r["stage"]
    return [
        "",
        f"Retrieval over {r['documents']:,} WordNet senses, {r['queries']:,} labeled queries: recall@3 {modes}. "
        f"Through the RAG stage (hybrid, C=1): its own time p50 {st['stage_p50_ms']} ms, p99 {st['stage_p99_ms']} "
        f"ms; round trip p50 {st['round_trip_p50_ms']} ms, p99 {st['round_trip_p99_ms']} ms. With 32 callers: "
        f"{st['batched_qps_c32']} queries/s with their embeddings batched, {st['unbatched_qps_c32']} one at a time. "
        f"Indexing: {r['index_docs_per_s']} documents/s.",
    ]


def _notes(extra: dict[str, Any]) -> list[str]:
    """One paragraph per measured cost: cancellation, tracing, coalescing, transport, TLS, tenants."""
    lines: list[str] = []
    if "cancel_stop_ms" in extra:
        c = extra["cancel_stop_ms"]
        lines += [
            "",
            f"Cancellation: the worker stopped {c['p50']} ms (p50), {c['p99']} ms (p99), {c['max']} ms (max) "
            f"after the client cancelled ({c['trials']} trials).",
        ]
    if "tracing" in extra:
        t = extra["tracing"]
        lines += [
            "",
            f"Tracing overhead (N=1, C=64, requests/s): off {t['rps']['off']}, on at 100% "
            f"{t['rps']['on, 100%']} (x{t['ratio_on_100']}), on at 1% {t['rps']['on, 1%']} "
            f"(x{t['ratio_on_1']}); {t['spans_received']} spans received.",
        ]
    if "coalescing_tokens_per_s" in extra:
        g = extra["coalescing_tokens_per_s"]
        base = g.get(1) or g.get("1")
        parts = [f"{k} per message: {v:.0f} tokens/s" + (f" (x{v / base:.2f})" if base else "") for k, v in g.items()]
        lines += ["", "Coalescing (N=128, C=64): " + "; ".join(parts) + "."]
    for key, ratios, what in (
        ("transport", "links_over_calls", "Stage links against a call per request per hop"),
        ("tls", "tls_over_plaintext", "TLS at the edge and mutual TLS on every hop against plaintext"),
    ):
        if key in extra:
            t = {str(n): r for n, r in extra[key][ratios].items()}
            lines += ["", f"{what} (C=64, requests/s): x{t['1']} at N=1, x{t['128']} at N=128."]
    if "layouts" in extra:
        parts = [
            f"{label}: first chunk x{r['ttfc_over_hop']}, requests/s x{r['rps_over_hop']}"
            for label, r in extra["layouts"].items()
        ]
        lines += ["", "Layouts against the single hop (N=1; C=1 in turns, and C=64): " + "; ".join(parts) + "."]
    if "relay" in extra:
        r = extra["relay"]
        lines += [
            "",
            f"Token relay with a paced worker (N=128, C=64): {r['paced_tokens_per_s']} tokens/s in "
            f"{r['paced_messages_per_s']} messages/s ({r['tokens_per_message']} tokens a message) through every hop; "
            f"the single hop sends {r['single_hop_messages_per_s']} messages/s (x{r['messages_over_single_hop']}).",
        ]
    if "per_core" in extra:
        p = extra["per_core"]
        lines += [
            "",
            f"Colocated pipelines behind one edge (N=1, C=64): 1 process {p['rps'][1]} req/s, 2 processes "
            f"{p['rps'][2]} req/s (x{p['two_over_one']}).",
        ]
    if "deadletters" in extra:
        d = extra["deadletters"]
        lines += [
            "",
            f"Dead letters (SQLite): requests/s on / off x{d['rps_on_over_off']}; with every tenth request failing "
            f"({d['failing_share'] * 100:.0f}% failed), the others' total p50 / p99 {d['ok_total_p50_ms']['on']} / "
            f"{d['ok_total_p99_ms']['on']} ms with the store on, {d['ok_total_p50_ms']['off']} / "
            f"{d['ok_total_p99_ms']['off']} ms off.",
        ]
    if "scaling" in extra:
        t = extra["scaling"]
        model = ", ".join(
            f"{n}: {rps} ({t['model_bound_over_linear'][n]}x linear)" for n, rps in t["model_bound_rps"].items()
        )
        lines += [
            "",
            f"Scaling, model-bound inference (requests/s by replicas): {model}. CPU-bound (N=1, C=64) with two "
            f"processes of every stage but the edge against one: x{t['cpu_bound_2_over_1']} on {t['cpus']} cores.",
        ]
    if "tenants" in extra:
        t = extra["tenants"]
        lines += [
            "",
            f"Tenants (each {t['rate_per_tenant']:g} requests/s): b alone {t['b_alone_rps']} ok/s, beside a offering "
            f"10x its rate {t['b_beside_a_rps']} ok/s; a got {t['a_rps']} ok/s and {t['a_rate_limited']} of its "
            f"{t['a_sent']} requests answered RATE_LIMITED.",
        ]
    return lines


def _memory_notes(extra: dict[str, Any]) -> list[str]:
    """Resident memory: idle, after the throughput runs, and its growth under repeated overload."""
    lines: list[str] = []
    if "idle_rss_mb" in extra:
        lines += ["", "Idle RSS per stage (MB): " + ", ".join(f"{k} {v}" for k, v in extra["idle_rss_mb"].items())]
    if "throughput_peak_rss_mb" in extra:
        peaks = extra["throughput_peak_rss_mb"]
        lines += [
            "Peak RSS per stage after the throughput runs (MB): "
            + ", ".join(f"{k} {v['peak_mb']}" for k, v in peaks.items())
        ]
    if "overload_rss_growth_mb" in extra:
        lines += [
            f"RSS growth from the first 4x overload step to the second: {extra['overload_rss_growth_mb']} MB "
            "(largest stage; the first steps grow the working set of the queues, a leak would grow again)."
        ]
    return lines
