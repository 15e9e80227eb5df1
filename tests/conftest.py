"""Shared fixtures: meshes of real stage processes on free loopback ports."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh, start_mesh
from orchestrator.v1 import admin_pb2, admin_pb2_grpc
from orchestrator_client import AsyncOrchestratorClient, OrchestratorClient

T = TypeVar("T")


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = ROOT / "deploy" / "tls" / "make-certs.sh"


def make_certs(directory: Path, *names: str, **env: str) -> Path:
    """Real certificates made now with openssl, by the script the README documents (``deploy/tls``)."""
    subprocess.run(
        ["bash", str(MAKE_CERTS), str(directory), *names], check=True, capture_output=True, env={**os.environ, **env}
    )
    return directory


class Security:
    """How the test meshes are secured: plaintext, or (``pytest --tls``) TLS at the edge with client certificates
    and mutual TLS between the stages, from certificates made for the session."""

    def __init__(self) -> None:
        self.certs: Path | None = None
        self.token: str | None = None

    def enable(self, certs: Path) -> None:
        """TLS from ``certs``, and an API key file there whose one key (an admin's) every test client shows."""
        from orchestrator.runtime.tenants import key_line, new_key

        self.certs = certs
        self.token = new_key()
        (certs / "keys.jsonl").write_text(key_line(self.token, "tests", "admin") + "\n")

    def env(self) -> dict[str, str]:
        if self.certs is None:
            return {}
        return {
            "ORCH_TLS_CERT_FILE": f"{self.certs}/{{stage}}.pem",
            "ORCH_TLS_KEY_FILE": f"{self.certs}/{{stage}}.key",
            "ORCH_TLS_CA_FILE": f"{self.certs}/ca.pem",
            "ORCH_TLS_CLIENT_CA_FILE": f"{self.certs}/ca.pem",
            "ORCH_AUTH_KEYS_FILE": f"{self.certs}/keys.jsonl",
        }

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The API key as call metadata, for calls made without the client library (admin, raw stubs)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        """A client's: the mesh's CA, and the client certificate the edge asks for."""
        c = self.certs
        if c is None:
            return None
        return grpc.ssl_channel_credentials(
            (c / "ca.pem").read_bytes(), (c / "client.key").read_bytes(), (c / "client.pem").read_bytes()
        )

    def node_env(self) -> dict[str, str]:
        """What ``tests/node/credentials.js`` reads."""
        if self.certs is None:
            return {}
        c = self.certs
        tls = {"TLS_CA": f"{c}/ca.pem", "TLS_CERT": f"{c}/client.pem", "TLS_KEY": f"{c}/client.key"}
        return tls | {"TOKEN": self.token or ""}

    def grpcurl_args(self) -> list[str]:
        if self.certs is None:
            return ["-plaintext"]
        c = self.certs
        tls = ["-cacert", f"{c}/ca.pem", "-cert", f"{c}/client.pem", "-key", f"{c}/client.key"]
        return [*tls, "-H", f"authorization: Bearer {self.token}"]


SECURITY = Security()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--tls", action="store_true", help="run the meshes with TLS at the edge and mutual TLS between stages"
    )
    parser.addoption(
        "--layout", default="", help="run the meshes with this server.layout, e.g. rag+assemble+inference+post+stream"
    )


# The layout the test meshes run with (``pytest --layout``): "" is a process per stage.
LAYOUT = {"value": ""}


def pytest_configure(config: pytest.Config) -> None:
    LAYOUT["value"] = config.getoption("--layout")
    # Dead letters of the test meshes go to a folder of the run's (the default is under the home folder).
    import tempfile

    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="orchestrator-test-state-")
    if config.getoption("--tls"):
        import tempfile

        SECURITY.enable(make_certs(Path(tempfile.mkdtemp(prefix="orchestrator-test-certs-"))))


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    shutil.rmtree(os.environ.pop("XDG_STATE_HOME", "/nonexistent"), ignore_errors=True)
    if SECURITY.certs is not None:
        shutil.rmtree(SECURITY.certs, ignore_errors=True)


def colocated(mesh: Mesh, a: str, b: str) -> bool:
    """Whether stages ``a`` and ``b`` of ``mesh`` run in one process (``pytest --layout``)."""
    return mesh.stages[a].popen is mesh.stages[b].popen


def mesh_client(address: str, **kwargs: object) -> AsyncOrchestratorClient:
    """An async client of the edge at ``address``, secured as the test meshes are."""
    kwargs.setdefault("token", SECURITY.token)
    return AsyncOrchestratorClient(address, credentials=SECURITY.credentials(), **kwargs)  # type: ignore[arg-type]


def mesh_sync_client(address: str, **kwargs: object) -> OrchestratorClient:
    kwargs.setdefault("token", SECURITY.token)
    return OrchestratorClient(address, credentials=SECURITY.credentials(), **kwargs)  # type: ignore[arg-type]


def mesh_channel(address: str) -> grpc.Channel:
    """A blocking channel to any stage (admin, health), secured as the test meshes are."""
    creds = SECURITY.credentials()
    return grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)


def mesh_aio_channel(address: str) -> grpc.aio.Channel:
    creds = SECURITY.credentials()
    return grpc.aio.insecure_channel(address) if creds is None else grpc.aio.secure_channel(address, creds)


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without ORCH_* and OTEL_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "OTEL_"))}
    env.update(extra)
    return env


def orchestrator_cli(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """The ``orchestrator`` command as a user runs it, output captured; the environment is ``clean_env()`` unless
    given."""
    return subprocess.run(
        [str(BIN / "orchestrator"), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env=clean_env() if env is None else env,
    )


def free_port_config(tmp_path: Path) -> Path:
    """The shipped pipeline.toml with every port 0, so a test cannot collide with a running mesh."""
    text = (ROOT / "pipeline.toml").read_text()
    for port in (*range(50051, 50056), *range(9101, 9106)):
        text = text.replace(f"port = {port}", "port = 0")
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def run_demo(config: Path, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """``orchestrator demo`` as `make run-mesh` runs it."""
    return subprocess.run(
        [str(BIN / "orchestrator"), "demo", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        env=env,
    )


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def start_on_free_port(
    command: Callable[[int], list[str]], ready: Callable[[int], bool], log_path: Path, timeout_s: float = 60
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server that cannot report a port it picked itself (Prometheus, uvicorn).

    Try random ports: a port taken in the meantime makes the server exit at once and we try another,
    so there is no bind-then-release race.
    """
    for _ in range(20):
        port = random.randint(20000, 60000)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command(port), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            if ready(port):
                return proc, port
            time.sleep(0.1)
        stop_process(proc)
    raise AssertionError(f"{command(0)[0]} did not start:\n" + log_path.read_text(errors="replace")[-3000:])


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_gently(proc: subprocess.Popen[str]) -> None:
    """Stop an ``orchestrator up`` as a user would (Ctrl-C), so that it stops its stages too; kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mesh_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without ORCH_* settings, every stage on port 0, plus ``overrides``."""
    env = clean_env()
    env.update({f"ORCH_{name.upper()}_PORT": "0" for name in STAGES})
    env.update({f"ORCH_{name.upper()}_METRICS_PORT": "0" for name in STAGES})
    env.update(SECURITY.env())
    if LAYOUT["value"]:
        env["ORCH_SERVER_LAYOUT"] = LAYOUT["value"]
    env.update(overrides)
    return env


def launch(run_dir: Path, config: str | None = None, **overrides: str) -> Mesh:
    return start_mesh(run_dir, config=config, env=mesh_env(**overrides), timeout_s=60)


def poll(check: Callable[[], T | None], timeout_s: float = 10.0, interval_s: float = 0.01, what: str = "") -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or check}")
        time.sleep(interval_s)


def stage_status(address: str, plaintext: bool = False) -> admin_pb2.GetStatusResponse:
    """A stage's (or, ``plaintext``, the worker server's) AdminService/GetStatus."""
    with grpc.insecure_channel(address) if plaintext else mesh_channel(address) as ch:
        reply: admin_pb2.GetStatusResponse = admin_pb2_grpc.AdminServiceStub(ch).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=5, metadata=() if plaintext else SECURITY.metadata()
        )
        return reply


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh with the instant echo worker, shared by a test module."""
    m = launch(tmp_path_factory.mktemp("mesh"))
    yield m
    m.stop()


@pytest.fixture(scope="module")
def slow_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A mesh whose echo worker takes 20 ms per token: long enough to cancel mid-stream."""
    m = launch(tmp_path_factory.mktemp("slow-mesh"), ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20")
    yield m
    m.stop()


@pytest.fixture
def fresh_mesh(tmp_path: Path) -> Iterator[Callable[..., Mesh]]:
    """Start meshes with custom settings; all are stopped after the test."""
    started: list[Mesh] = []

    def _start(config: str | None = None, **overrides: str) -> Mesh:
        m = launch(tmp_path / f"mesh{len(started)}", config, **overrides)
        started.append(m)
        return m

    yield _start
    for m in started:
        m.stop()


def scrape(metrics_address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A stage's Prometheus /metrics, as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
