"""Clients other than ours: grpcurl through reflection, and Node's @grpc/grpc-js from the .proto files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.launcher import Mesh
from tests.conftest import SECURITY, mesh_sync_client

pytestmark = [pytest.mark.mesh, pytest.mark.peer]

ROOT = Path(__file__).resolve().parents[2]
GRPCURL = str(Path(sys.executable).with_name("grpcurl"))
NODE_DIR = ROOT / "tests" / "node"


def grpcurl(*args: str) -> str:
    done = subprocess.run(
        [GRPCURL, *SECURITY.grpcurl_args(), *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_stage_lists_its_services_through_reflection(mesh: Mesh) -> None:
    expected = {
        "rag": "orchestrator.v1.RagService",
        "assemble": "orchestrator.v1.AssembleService",
        "inference": "orchestrator.v1.InferenceService",
        "post": "orchestrator.v1.PostService",
        "stream": "orchestrator.v1.StreamService",
    }
    for stage, service in expected.items():
        listed = set(grpcurl(mesh.address(stage), "list").split())
        assert {service, "grpc.health.v1.Health", "orchestrator.v1.AdminService"} <= listed, stage


def test_grpcurl_health_and_submit(mesh: Mesh) -> None:
    health = json.loads(grpcurl(mesh.entry, "grpc.health.v1.Health/Check"))
    assert health == {"status": "SERVING"}
    request = json.dumps({"session": {"id": "curl"}, "input": "What is gRPC reflection?", "params": {"maxTokens": 12}})
    out = grpcurl("-d", request, mesh.entry, "orchestrator.v1.StreamService/Submit")
    chunks = [json.loads(doc) for doc in out.replace("}\n{", "}\x00{").split("\x00")]
    assert chunks[-1]["completion"]["usage"]["completion_tokens"] == 12  # grpcurl keeps proto field names
    with mesh_sync_client(mesh.entry) as client:
        expected = client.complete("What is gRPC reflection?", session="curl", max_tokens=12).text
    assert "".join(c.get("text", "") for c in chunks) == expected


def test_grpcurl_sees_the_shed_stage_in_trailers(mesh: Mesh) -> None:
    done = subprocess.run(
        [
            GRPCURL,
            *SECURITY.grpcurl_args(),
            "-v",
            "-d",
            '{"input": ""}',
            mesh.entry,
            "orchestrator.v1.StreamService/Submit",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0
    assert "InvalidArgument" in done.stderr or "INVALID_ARGUMENT" in done.stderr.upper()
    assert "orchestrator-stage: stream" in done.stdout


def _node(package: str, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of the Node clients (it needs ``package`` installed) against the mesh; it must succeed."""
    if not (NODE_DIR / "node_modules" / package).exists():
        pytest.fail("Node dependencies missing: run 'make node-deps' (make test does)")
    done = subprocess.run(
        ["node", str(NODE_DIR / script), *args],
        env={**os.environ, **SECURITY.node_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_client_reads_a_full_stream(mesh: Mesh) -> None:
    user_input = "How do Node clients read server streams?"
    done = _node("@grpc/grpc-js", "submit.js", mesh.entry, "node", "24", user_input)
    chunks = [json.loads(line) for line in done.stdout.splitlines()]
    assert [c["sequence"] for c in chunks] == list(range(len(chunks)))
    final = chunks[-1]["completion"]
    assert final["finish_reason"] == "FINISH_REASON_LENGTH"
    assert final["usage"]["completion_tokens"] == 24
    assert [t["stage"] for t in final["timings"]] == ["rag", "assemble", "inference", "post", "stream"]
    with mesh_sync_client(mesh.entry) as client:
        expected = client.complete(user_input, session="node", max_tokens=24).text
    assert "".join(c["text"] for c in chunks) == expected


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_node_client_discovers_the_mesh_through_reflection_and_calls_it(mesh: Mesh, version: str) -> None:
    """A Node client with no .proto files: it lists the services and fetches the edge's descriptors through
    reflection (grpc.reflection.v1, which current tools try first, and v1alpha), then streams a completion."""
    done = _node("grpc-js-reflection-client", "reflect.js", mesh.entry, version)
    found = json.loads(done.stdout)
    assert {"orchestrator.v1.StreamService", "grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= set(
        found["services"]
    )
    assert found["tokens"] == 5 and found["text"]
