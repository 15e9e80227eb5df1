"""Scaling a stage found by DNS, on separate hosts: inference goes 2 -> 3 -> 2 replicas while load runs, by changing a
real DNS server's records (dnsmasq) and starting and draining processes. Nothing fails, sessions move only as
rendezvous hashing over the live set predicts, and the replica that leaves finishes its streams before it exits."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from typing import Any

import pytest

from orchestrator.core.affinity import rendezvous_order
from tests.conftest import ROOT, clean_env, make_certs
from tests.multihost.netns import DnsServer, Network
from tests.multihost.test_faults import drive

pytestmark = [
    pytest.mark.multihost,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (Debian: dnsmasq)"),
]

NAME = "inference.mesh.test"
PORT = 50053  # every inference replica on its own host, at the same port: the DNS name gives their addresses


def owners(sessions: set[str], live: list[str]) -> dict[str, str]:
    return {s: rendezvous_order(s, live)[0] for s in sessions}


def answered_after(samples: list[dict[str, Any]], start: float, end: float) -> dict[str, set[str]]:
    """Which replicas answered each session, for requests sent between ``start`` and ``end``."""
    out: dict[str, set[str]] = {}
    for s in samples:
        if start <= s["t"] < end and "replica" in s:
            out.setdefault(s["session"], set()).add(s["replica"])
    return out


def test_inference_scales_2_3_2_through_dns_under_load_with_nothing_lost(network: Network) -> None:
    certs = make_certs(network.run_dir / "certs")
    dns = DnsServer(network.host("dns"))
    env = clean_env(
        ORCH_TLS_CERT_FILE=f"{certs}/{{stage}}.pem",
        ORCH_TLS_KEY_FILE=f"{certs}/{{stage}}.key",
        ORCH_TLS_CA_FILE=f"{certs}/ca.pem",
        ORCH_NETWORK_RESOLVE_INTERVAL_S="1",
        ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20",
    )
    edge = network.host("edge")
    edge.use_dns(dns.address)
    rag = edge.start_stage("rag", env)
    assemble = edge.start_stage("assemble", env | {"ORCH_RAG_ENDPOINTS": rag})
    hosts = {n: network.host(n) for n in ("infa", "infb", "infc")}
    inference_env = env | {"ORCH_ASSEMBLE_ENDPOINTS": assemble, "ORCH_INFERENCE_PORT": str(PORT)}
    a, b = (hosts[n].start_stage("inference", inference_env) for n in ("infa", "infb"))
    dns.add(NAME, hosts["infa"].ip)
    dns.add(NAME, hosts["infb"].ip)
    post = edge.start_stage("post", env | {"ORCH_INFERENCE_ENDPOINTS": f"dns:{NAME}:{PORT}"})
    stream = edge.start_stage("stream", env | {"ORCH_POST_ENDPOINTS": post})

    def settled(expect: list[str]) -> float:
        """When the post stage called exactly ``expect``."""
        spec = {"scenario": "callees", "address": post, "stage": "post", "certs": str(certs), "expect": expect}
        seen = drive(edge, spec | {"timeout_s": 20})
        assert seen["callees"] == sorted(expect), seen
        return float(seen["at"])

    t_two = settled([a, b])
    client = network.host("client")
    spec = {"scenario": "load", "edge": stream, "certs": str(certs), "workers": 6, "sessions": 40}
    loader = client.popen([sys.executable, "-m", "tests.multihost.client", json.dumps(spec)], env, "load.log", ROOT)
    assert loader.stdout is not None and loader.stdin is not None
    assert json.loads(loader.stdout.readline()) == {"under_way": True}
    time.sleep(2)

    # 2 -> 3: start a replica, then publish it.
    c = hosts["infc"].start_stage("inference", inference_env)
    dns.add(NAME, hosts["infc"].ip)
    t_three = settled([a, b, c])
    time.sleep(3)

    # 3 -> 2: unpublish b, let its callers move off it, then drain it (SIGTERM) as a scaled-down pod is.
    dns.remove(hosts["infb"].ip)
    t_back = settled([a, c])
    b_proc = hosts["infb"].procs[-1]
    b_proc.send_signal(signal.SIGTERM)
    assert b_proc.wait(30) == 0  # drained within its grace period: its streams finished
    time.sleep(3)

    loader.stdin.write("stop\n")
    loader.stdin.flush()
    out, _ = loader.communicate(timeout=60)
    samples = json.loads(out.strip().splitlines()[-1])["samples"]
    errors = [s for s in samples if "error" in s]
    assert errors == [], errors[:5]
    sessions = {s["session"] for s in samples}

    # Each phase: every session answered by its rendezvous owner over the live set, and only by it.
    phases = [([a, b], t_two, t_three - 1.5), ([a, b, c], t_three + 1.5, t_back - 1.5), ([a, c], t_back + 1.5, 1e18)]
    for live, start, end in phases:
        seen = answered_after(samples, start, end)
        assert seen, (live, start, end)
        expected = owners(set(seen), live)
        assert {s: replicas for s, replicas in seen.items() if replicas != {expected[s]}} == {}, live
    # Minimal moves: 2 -> 3 moved exactly the sessions the new replica owns; 3 -> 2 only those b owned.
    two, three, back = owners(sessions, [a, b]), owners(sessions, [a, b, c]), owners(sessions, [a, c])
    assert {s for s in sessions if two[s] != three[s]} == {s for s in sessions if three[s] == c}
    assert {s for s in sessions if three[s] != back[s]} == {s for s in sessions if three[s] == b}
    # The replica that left served until it was unpublished, and nothing was sent to it after.
    assert not any(s.get("replica") == b for s in samples if s["t"] > t_back + 0.1)
