"""The command-line front doors: the demo behind `make run-mesh`, validate, and the client CLI."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh
from tests.conftest import BIN, ROOT, clean_env, free_port_config, mesh_sync_client, run_demo, stop_gently


def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = clean_env()
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, env={**base, **(env or {})}, cwd=cwd
    )


@pytest.mark.mesh
def test_demo_prints_ten_answers_and_stops_cleanly(tmp_path: Path) -> None:
    done = run_demo(free_port_config(tmp_path), clean_env(), timeout_s=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary: 10 completed, 0 shed, 0 failed (of 10)" in done.stdout
    assert done.stdout.count("  A: ") == 10
    assert "stopped all five stages" in done.stdout
    assert "non-zero" not in done.stdout


def test_validate_accepts_the_shipped_config() -> None:
    done = run(str(BIN / "orchestrator"), "validate", "--config", str(ROOT / "pipeline.toml"))
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout


def test_validate_reports_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[rag]\ntop_kk = 3\nport = "x"\n[inference]\nconcurrency = 0\n[inference.worker]\nkind = "gpt"\n')
    done = run(str(BIN / "orchestrator"), "validate", "--config", str(bad), env={"ORCH_STREAM_QUEUE_CAPACITY": "lots"})
    assert done.returncode == 1
    for problem in (
        "unknown key 'rag.top_kk' (did you mean 'top_k'?)",
        "rag.port: expected an integer, got 'x'",
        "ORCH_STREAM_QUEUE_CAPACITY: expected an integer, got 'lots'",
        "inference.concurrency must be >= 1",
        "inference.worker.kind 'gpt' is not one of echo",
    ):
        assert problem in done.stderr, problem


def test_stage_with_bad_config_exits_2_with_the_reason() -> None:
    done = run(sys.executable, "-m", "orchestrator.stages.rag", env={"ORCH_RAG_TOP_K": "-1"}, timeout=30)
    assert done.returncode == 2
    assert "rag.top_k must be >= 0" in done.stderr


@pytest.mark.mesh
def test_client_cli_streams_and_reports_errors(mesh: Mesh) -> None:
    done = run(str(BIN / "orchestrator-client"), "submit", "--target", mesh.entry, "--max-tokens", "6", "What is BM25?")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Answer the question")
    assert "6 completion tokens" in done.stderr
    bad = run(str(BIN / "orchestrator-client"), "submit", "--target", mesh.entry, "--max-tokens", "99999", "hi")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT (stage stream): params.max_tokens is 99999" in bad.stderr


@pytest.mark.parametrize("flags", [(), ("--metrics",), ("--stages",)])
def test_tables_in_readme_match_the_code(flags: tuple[str, ...]) -> None:
    done = run(str(BIN / "orchestrator"), "config", *flags)
    assert done.returncode == 0
    readme = (ROOT / "README.md").read_text()
    for row in done.stdout.strip().splitlines():
        assert row in readme, f"README has a stale table: run `make docs`. Missing row: {row}"


@pytest.mark.mesh
def test_up_runs_in_the_foreground_until_interrupted(tmp_path: Path) -> None:
    env = clean_env()
    env.update({f"ORCH_{s.upper()}_PORT": "0" for s in STAGES})
    env.update({f"ORCH_{s.upper()}_METRICS_PORT": "0" for s in STAGES})
    proc = subprocess.Popen(
        [str(BIN / "orchestrator"), "up"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # ends at EOF if the process dies, so this cannot hang forever
            lines.append(line)
            if line.startswith("mesh is up"):
                break
        entry = lines[-1].rsplit(" ", 1)[-1].strip()
        with mesh_sync_client(entry) as client:
            assert client.complete("hello", session="up", max_tokens=2).completion.usage.completion_tokens == 2
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, "".join(lines) + out
        assert "stopped all five stages" in out
    finally:
        stop_gently(proc)


@pytest.mark.mesh
def test_status_shows_every_stage(mesh: Mesh) -> None:
    with mesh_sync_client(mesh.entry) as client:
        client.complete("count me", session="status", max_tokens=2)
    done = run(
        str(BIN / "orchestrator"),
        "status",
        *(mesh.address(s) for s in STAGES),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["rag", "assemble", "inference", "post", "stream"]
    assert "echo (0 generating" in lines[3]
    down = run(str(BIN / "orchestrator"), "status", "127.0.0.1:1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
