"""A vector index of the user's documents, built by the CLI, served by the RAG stage through the mesh."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import pytest

from orchestrator.launcher import Mesh
from orchestrator.v1 import admin_pb2, admin_pb2_grpc, stages_pb2_grpc, types_pb2
from orchestrator_client import build_request
from tests.conftest import (
    mesh_channel,
    mesh_env,
    mesh_sync_client,
    orchestrator_cli,
    poll,
    stage_status,
)

pytestmark = pytest.mark.mesh

DOCS = [
    {
        "id": "car",
        "title": "Cars",
        "text": "A motor vehicle with four wheels, propelled by an engine.",
        "source": "v.md",
    },
    {"id": "cat", "title": "Cats", "text": "A small domesticated feline that purrs and hunts mice."},
    {"id": "bread", "title": "Baking", "text": "Flour, water and yeast are kneaded into dough and baked."},
    {"id": "tax", "title": "Taxes", "text": "Income tax returns are filed every April with the revenue service."},
    {"id": "rain", "title": "Weather", "text": "Rain falls when water droplets in clouds grow heavy."},
]
MORE = [
    {"id": "bike", "title": "Bicycles", "text": "A two-wheeled vehicle moved by pedals and a chain."},
    {"id": "violin", "title": "Violins", "text": "A bowed string instrument with four strings tuned in fifths."},
]
QUERIES = ["automobile", "my kitten keeps chasing rodents", "how is a loaf made", "filing income tax", "stormy clouds"]


def write_jsonl(path: Path, rows: list[dict[str, str]], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def retrieve(address: str, text: str) -> list[types_pb2.Document]:
    with mesh_channel(address) as channel:
        stub = stages_pb2_grpc.RagServiceStub(channel)
        replies = list(stub.Retrieve(build_request(text, session="index-test"), timeout=10))
    return [d for r in replies for d in r.documents]


def finds(address: str, text: str, doc_id: str) -> bool:
    return retrieve(address, text)[0].id == doc_id


def ranked(address: str) -> list[list[tuple[str, float]]]:
    return [[(d.id, round(d.score, 6)) for d in retrieve(address, q)] for q in QUERIES]


@pytest.fixture
def built(tmp_path: Path) -> Path:
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    done = orchestrator_cli("index", "build", str(docs), "--out", str(tmp_path / "ix"))
    assert done.returncode == 0, done.stderr
    return tmp_path / "ix"


def test_bad_documents_are_refused_or_skipped_by_line(tmp_path: Path) -> None:
    docs = write_jsonl(tmp_path / "docs.jsonl", DOCS[:2], '{"id": "empty", "text": ""}\n{broken\n')
    done = orchestrator_cli("index", "build", str(docs), "--out", str(tmp_path / "ix"))
    assert done.returncode == 1
    assert "line 3: empty text" in done.stderr and "line 4: invalid JSON" in done.stderr
    assert not (tmp_path / "ix" / "manifest.json").exists()
    done = orchestrator_cli("index", "build", str(docs), "--out", str(tmp_path / "ix"), "--skip-bad")
    assert done.returncode == 0, done.stderr
    assert "line 3: empty text (skipped)" in done.stderr and "line 4: invalid JSON" in done.stderr
    assert "built" in done.stdout and "2 documents" in done.stdout and "documents/s" in done.stdout
    info = orchestrator_cli("index", "info", str(tmp_path / "ix"), "--json")
    assert json.loads(info.stdout)["documents"] == 2


def test_an_index_serves_through_the_mesh_and_after_a_restart(built: Path, fresh_mesh: Callable[..., Mesh]) -> None:
    mesh = fresh_mesh(ORCH_RAG_INDEX=str(built))
    docs = retrieve(mesh.address("rag"), "automobile")
    assert docs[0].id == "car" and docs[0].source == "v.md"
    assert docs[0].HasField("dense_score") and docs[0].dense_score > 0.3
    assert not docs[0].HasField("bm25_score")  # no term in common: found by meaning alone
    before = ranked(mesh.address("rag"))
    assert [r[0][0] for r in before] == ["car", "cat", "bread", "tax", "rain"]
    # Through the edge: the retrieved document is the answer's context (the echo worker repeats the prompt).
    with mesh_sync_client(mesh.entry) as client:
        answer = "".join(c.text for c in client.submit("automobile", session="s", max_tokens=12))
    assert "[car]" in answer

    mesh.kill("rag")
    mesh.restart("rag")
    assert ranked(mesh.address("rag")) == before


def reload(address: str) -> str:
    with mesh_channel(address) as channel:
        reply = admin_pb2_grpc.AdminServiceStub(channel).Reload(admin_pb2.ReloadRequest(), timeout=30)
    return str(reply.worker)


def test_added_documents_are_served_after_a_reload_and_a_bad_index_is_refused(
    built: Path, tmp_path: Path, fresh_mesh: Callable[..., Mesh]
) -> None:
    mesh = fresh_mesh(ORCH_RAG_INDEX=str(built), ORCH_RAG_INDEX_CHECK_S="0")  # told, not following
    rag = mesh.address("rag")
    more = write_jsonl(tmp_path / "more.jsonl", [*MORE, DOCS[0]])
    done = orchestrator_cli("index", "add", str(built), str(more))
    assert done.returncode == 1 and "'car' is in the index already" in done.stderr
    done = orchestrator_cli("index", "add", str(built), str(more), "--skip-bad")
    assert done.returncode == 0 and "now 7, generation 2" in done.stdout, done.stderr
    assert retrieve(rag, "pedalling to work")[0].id != "bike"  # the stage still serves generation 1
    assert reload(rag) == f"hybrid over index {built} generation 2 (7 documents)"
    assert retrieve(rag, "pedalling to work")[0].id == "bike"
    # An index the stage cannot read is refused; the stage keeps serving the one it has.
    served = ranked(rag)
    (built / "manifest.json").write_text("{}")
    with pytest.raises(grpc.RpcError) as refused:
        reload(rag)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a prompt-orchestrator-index directory" in str(refused.value.details())
    assert ranked(rag) == served


def test_two_rag_replicas_reading_one_index_agree_and_follow_it(
    built: Path, tmp_path: Path, fresh_mesh: Callable[..., Mesh]
) -> None:
    mesh = fresh_mesh(ORCH_RAG_INDEX=str(built), ORCH_RAG_REPLICAS="2", ORCH_RAG_INDEX_CHECK_S="0.2")
    first, second = mesh.addresses("rag")
    assert first != second
    assert ranked(first) == ranked(second)
    # A new generation reaches both replicas without a signal; then they agree on it too.
    done = orchestrator_cli("index", "add", str(built), str(write_jsonl(tmp_path / "more.jsonl", MORE)))
    assert done.returncode == 0, done.stderr
    for replica in (first, second):
        poll(partial(finds, replica, "pedalling to work", "bike"), timeout_s=30, interval_s=0.2, what=replica)
    assert ranked(first) == ranked(second)
    # Each replica names what it serves in its status, and `orchestrator status` shows it.
    for replica in (first, second):
        assert stage_status(replica).serving == f"hybrid over index {built} generation 2 (7 documents)"
    status = orchestrator_cli("status", first)
    assert status.returncode == 0 and f"hybrid over index {built} generation 2 (7 documents)" in status.stdout


@pytest.mark.parametrize("tamper", ["fingerprint", "version"])
def test_a_mismatched_index_stops_the_stage_with_a_reason(built: Path, tmp_path: Path, tamper: str) -> None:
    manifest = json.loads((built / "manifest.json").read_text())
    manifest[tamper] = "0" * 32 if tamper == "fingerprint" else 2
    (built / "manifest.json").write_text(json.dumps(manifest))
    env = mesh_env(ORCH_RAG_INDEX=str(built))
    done = orchestrator_cli("stage", "rag", env=env, timeout=60)
    assert done.returncode == 1
    expected = "was built with embedding model" if tamper == "fingerprint" else "format version 2"
    assert expected in done.stderr and "Traceback" not in done.stderr
