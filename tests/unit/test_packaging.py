"""Three distributions from one repository: the protocol, the client and the server. The client installs and
runs without the server; each wheel holds only its own part."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_the_client_runs_without_the_server_on_the_path() -> None:
    script = """
import sys
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("/services")]
import grpc
import orchestrator_client
from orchestrator_client import OrchestratorRpcError
try:
    import orchestrator.core
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("the server's code is importable: the test does not isolate the client")
from orchestrator.v1.status import encode_status
trailers = encode_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "OVERLOADED", stage="rag", retry_after_s=0.5)
class Failed(grpc.RpcError):
    def code(self): return grpc.StatusCode.RESOURCE_EXHAUSTED
    def details(self): return "full"
    def trailing_metadata(self): return trailers
err = OrchestratorRpcError.from_call_error(Failed())
assert (err.stage, err.reason, err.retry_after_s) == ("rag", "OVERLOADED", 0.5), err
client = orchestrator_client.OrchestratorClient("127.0.0.1:1")
client.close()
print("client ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client ok" in done.stdout


def _wheel(project: Path, parts: list[str], tmp: Path) -> zipfile.ZipFile:
    """Build ``project`` from a copy of its ``parts`` (setuptools leaves build folders where it builds)."""
    src, out = tmp / "src", tmp / "out"
    for part in parts:
        if (project / part).is_dir():
            shutil.copytree(project / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy(project / part, src / part)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _files(wheel: zipfile.ZipFile) -> set[str]:
    return {n for n in wheel.namelist() if ".dist-info/" not in n}


def _requires(wheel: zipfile.ZipFile) -> list[str]:
    (meta,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(meta).decode().splitlines()
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]


def test_each_wheel_holds_only_its_own_part(tmp_path: Path) -> None:
    protos = _wheel(ROOT / "protos", ["pyproject.toml", "orchestrator"], tmp_path / "protos")
    assert {f.split("/")[0:2] == ["orchestrator", "v1"] for f in _files(protos)} == {True}
    assert {"orchestrator/v1/stages.proto", "orchestrator/v1/stages_pb2.py", "orchestrator/v1/status.py"} <= _files(
        protos
    )

    client_files = [p.name for p in (ROOT / "orchestrator_client").iterdir() if p.suffix in (".py", ".toml", ".typed")]
    client = _wheel(ROOT / "orchestrator_client", client_files, tmp_path / "client")
    assert {f.split("/")[0] for f in _files(client)} == {"orchestrator_client"}
    assert "orchestrator_client/pyproject.toml" not in _files(client)
    assert not [r for r in _requires(client) if r.startswith("prompt-orchestrator ")]

    server = _wheel(ROOT, ["pyproject.toml", "README.md", "services"], tmp_path / "server")
    files = _files(server)
    assert {f.split("/")[0] for f in files} == {"orchestrator"}
    assert not [f for f in files if f.startswith("orchestrator/v1/")]  # the protocol's own distribution has it
    assert "orchestrator/data/docs.jsonl" in files and "orchestrator/cli.py" in files
    assert {r.split("=")[0] for r in _requires(server)} >= {"prompt-orchestrator-protos", "prompt-orchestrator-client"}
