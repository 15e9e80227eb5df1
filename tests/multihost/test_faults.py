"""Faults that send no reset, on separate hosts: a silently partitioned replica, a client that vanished, a lossy
link. Each stage process runs in its own network namespace; a partition drops every packet of one host."""

from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import pytest

from tests.conftest import ROOT, clean_env, make_certs
from tests.multihost.netns import Host, Network

pytestmark = pytest.mark.multihost

SLOW = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20"}


def start_mesh(net: Network, links: str = "true", **inference: dict[str, str]) -> dict[str, Any]:
    """RAG, Assemble, Post and the edge on one host, each inference replica (name -> its settings) on its own; every
    hop mutual TLS, as it must be between hosts, and clients with certificates too."""
    certs = make_certs(net.run_dir / "certs")
    edge_host = net.host("edge")
    env = clean_env(
        ORCH_SERVER_STAGE_LINKS=links,
        ORCH_TLS_CERT_FILE=f"{certs}/{{stage}}.pem",
        ORCH_TLS_KEY_FILE=f"{certs}/{{stage}}.key",
        ORCH_TLS_CA_FILE=f"{certs}/ca.pem",
        ORCH_TLS_CLIENT_CA_FILE=f"{certs}/ca.pem",
    )
    rag = edge_host.start_stage("rag", env)
    assemble = edge_host.start_stage("assemble", env | {"ORCH_RAG_ENDPOINTS": rag})
    replicas, hosts = [], {}
    for name, settings in inference.items():
        hosts[name] = net.host(name)
        own = {"ORCH_ASSEMBLE_ENDPOINTS": assemble, "ORCH_INFERENCE_WORKER_NAME": name, **settings}
        replicas.append(hosts[name].start_stage("inference", env | own))
    post = edge_host.start_stage("post", env | {"ORCH_INFERENCE_ENDPOINTS": ",".join(replicas)})
    edge = edge_host.start_stage("stream", env | {"ORCH_POST_ENDPOINTS": post})
    return {
        "edge": edge,
        "edge_host": edge_host,
        "replicas": replicas,
        "hosts": hosts,
        "client": net.host("client"),
        "certs": str(certs),
    }


def drive(host: Host, spec: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    """Run a scenario of ``tests/multihost/client.py`` on ``host``; what it saw."""
    proc = host.popen(
        [sys.executable, "-m", "tests.multihost.client", json.dumps(spec)], clean_env(), "client.log", ROOT
    )
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, (host.network.run_dir / "client.log").read_text()[-3000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("links", ["true", "false"])
def test_a_silently_partitioned_replica_costs_its_sessions_little_and_the_others_nothing(
    network: Network, links: str
) -> None:
    mesh = start_mesh(network, links, infa=SLOW, infb=SLOW)
    seen = drive(
        mesh["client"],
        {
            "scenario": "partition",
            "edge": mesh["edge"],
            "certs": mesh["certs"],
            "replicas": mesh["replicas"],
            "names": ["infa", "infb"],
            "victim_ns": mesh["hosts"]["infa"].ns,
        },
    )
    before = {r["session"]: r for r in seen["before"]}
    assert all("error" not in r for r in before.values()), before
    slowest_before = max(r["s"] for r in before.values())
    owners = {s: r["model"] for s, r in before.items()}
    for r in seen["during"]:
        assert "error" not in r, r  # every new request completed
        if owners[r["session"]] == "infa":  # the silent replica's sessions: on the other replica, <= 3 s later
            assert r["model"] == "infb" and r["s"] <= slowest_before + 3.0, r
        else:  # the other sessions: latency unchanged
            assert r["model"] == "infb" and r["s"] <= slowest_before + 0.5, r
    for r in seen["streams"]:  # streams under way on the silent replica end UNAVAILABLE naming it, within 5 s
        assert (r["error"], r["stage"]) == ("UNAVAILABLE", "inference"), r
        assert r["after_s"] <= 5.0, r
    assert all(r.get("model") == "infa" for r in seen["after"]), seen["after"]  # healed: its sessions return


@pytest.mark.parametrize("links", ["true", "false"])
@pytest.mark.parametrize("before_first_token", [False, True], ids=["mid-stream", "before-first-token"])
def test_a_vanished_client_is_noticed_and_its_generation_stops(
    network: Network, before_first_token: bool, links: str
) -> None:
    # Before the first token: the worker waits for a gate file that never appears, so nothing is streaming.
    # Mid-stream: a token every 100 ms, so the answer (~150 tokens) is still streaming when the client goes.
    gated = {"ORCH_INFERENCE_WORKER_ECHO_GATE_FILE": "/nonexistent/gate"}
    settings = gated if before_first_token else {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "100"}
    mesh = start_mesh(network, links, inf=settings)
    n = 3
    spec = {
        "scenario": "hold",
        "edge": mesh["edge"],
        "certs": mesh["certs"],
        "n": n,
        "first_chunk": not before_first_token,
        "hold_s": 60,
    }
    holder = mesh["client"].popen(
        [sys.executable, "-m", "tests.multihost.client", json.dumps(spec)], clean_env(), "holder.log", ROOT
    )
    assert holder.stdout is not None
    line = holder.stdout.readline()
    assert json.loads(line) == {"under_way": True}, (network.run_dir / "holder.log").read_text()[-3000:]
    mesh["client"].partition()  # the client vanishes: no FIN, no reset
    vanished = time.monotonic()
    seen = drive(
        mesh["edge_host"],
        {
            "scenario": "watch",
            "address": mesh["replicas"][0],
            "certs": mesh["certs"],
            "cancelled": n,
            "timeout_s": 15,
        },
    )
    assert seen["active"] == 0, seen
    assert seen["idle_at"] - vanished <= 5.0, seen  # noticed and cancelled in every stage within 5 s
    assert seen["cancelled"] >= n, seen


def test_two_percent_loss_costs_only_retransmits(network: Network) -> None:
    mesh = start_mesh(network, inf=SLOW)
    seen = drive(
        mesh["client"],
        {
            "scenario": "lossy",
            "edge": mesh["edge"],
            "certs": mesh["certs"],
            "lossy_ns": mesh["hosts"]["inf"].ns,
            "percent": 2,
            "n": 30,
        },
    )
    assert all("error" not in r for r in seen["clean"] + seen["lossy"]), seen
    clean = statistics.median(r["s"] for r in seen["clean"])
    lossy = statistics.median(r["s"] for r in seen["lossy"])
    assert lossy <= clean + 0.3, (clean, lossy)
