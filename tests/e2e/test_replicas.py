"""Replicas on one machine: ``replicas = 3`` for inference starts three processes, sessions go where rendezvous
hashing over them says, and ``orchestrator status`` finds every replica by walking the mesh from the edge."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.graph import STAGES
from tests.conftest import BIN, clean_env, free_port_config, mesh_sync_client, orchestrator_cli, stop_gently

pytestmark = pytest.mark.mesh

_REPLICA = re.compile(r"^\s+(?P<key>[a-z]+(?:-\d+)?)\s+(?P<address>\S+:\d+)\s+pid \d+$")


def test_three_inference_replicas_on_one_machine(tmp_path: Path) -> None:
    config = free_port_config(tmp_path)
    env = clean_env(ORCH_INFERENCE_REPLICAS="3", ORCH_STREAM_REPLICAS="2")
    proc = subprocess.Popen(
        [str(BIN / "orchestrator"), "up", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        replicas: dict[str, str] = {}
        for line in proc.stdout:  # ends at EOF if the process dies, so this cannot hang forever
            if m := _REPLICA.match(line):
                replicas[m["key"]] = m["address"]
            if line.startswith("mesh is up"):
                break
        assert set(replicas) == {*STAGES, "inference-1", "inference-2", "stream-1"}, replicas
        inference = [replicas[k] for k in ("inference", "inference-1", "inference-2")]
        sessions = [f"user-{i}" for i in range(12)]
        with mesh_sync_client(replicas["stream"]) as client:
            served = {
                s: next(
                    t.replica
                    for t in client.complete("Which replica am I on?", session=s, max_tokens=2).completion.timings
                    if t.stage == "inference"
                )
                for s in sessions
            }
        assert served == {s: rendezvous_order(s, inference)[0] for s in sessions}
        assert len(set(served.values())) >= 2  # 12 sessions over 3 replicas: spread

        status = orchestrator_cli(
            *("status", "--config", str(config), "--from", replicas["stream"], "--from", replicas["stream-1"]),
            env=env,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        rows = [line.split() for line in status.stdout.splitlines()[1:]]
        assert sorted(r[1] for r in rows if r[0] == "inference") == sorted(inference)
        assert {r[0] for r in rows} == set(STAGES)
        assert sorted(r[1] for r in rows if r[0] == "stream") == sorted([replicas["stream"], replicas["stream-1"]])
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
    finally:
        stop_gently(proc)
