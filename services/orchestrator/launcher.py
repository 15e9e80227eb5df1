"""Start the five stages as processes on one machine, wait until they serve, stop them cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.core.config import ConfigError, TlsConfig, load_config
from orchestrator.core.graph import CALLEE, EDGE, STAGES
from orchestrator.runtime.security import operator_channel

_POLL_S = 0.02


class LaunchError(RuntimeError):
    """A stage did not come up; the message includes the end of its log."""


@dataclass
class StageProcess:
    name: str
    popen: subprocess.Popen[bytes]
    address: str
    log_path: Path | None
    env: dict[str, str]
    config: str | None
    metrics_address: str = ""
    health_address: str = ""
    # AdminService's own listener, when the stage has one (``<stage>.admin_port``); else its address.
    admin_address: str = ""

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def spawn_stage(
    name: str,
    env: Mapping[str, str],
    ready: Path,
    log_path: Path | None,
    config: str | None = None,
    wrap: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start the stage ``name`` as a process that writes ``ready`` once it serves; ``wrap`` runs it under another
    command (``ip netns exec HOST``, for the multi-host tests)."""
    ready.unlink(missing_ok=True)
    argv = [*wrap, sys.executable, "-m", f"orchestrator.stages.{name}", "--ready-file", str(ready)]
    if config:
        argv += ["--config", config]
    stderr = open(log_path, "ab") if log_path else None  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(argv, env=dict(env), stdin=subprocess.DEVNULL, stderr=stderr)
    finally:
        if stderr is not None:
            stderr.close()


def wait_ready_file(
    name: str, popen: subprocess.Popen[bytes], ready: Path, log_path: Path | None, timeout_s: float
) -> dict[str, str]:
    """What the stage wrote to ``ready`` once serving (its address), or LaunchError with the end of its log."""
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if popen.poll() is not None:
            raise LaunchError(f"{name} stage exited with code {popen.returncode} before serving\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{name} stage did not start within {timeout_s:.0f}s\n{_tail(log_path)}")
        time.sleep(_POLL_S)
    info: dict[str, str] = json.loads(ready.read_text())
    return info


def wait_healthy(address: str, timeout_s: float, tls: TlsConfig | None = None, stage: str = EDGE) -> None:
    """Poll grpc.health.v1 until the ``stage`` server at ``address`` reports SERVING."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with operator_channel(tls or TlsConfig(), address, stage) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"  # e.g. a TLS handshake that failed, and why
            if time.monotonic() > deadline:
                raise LaunchError(f"{address} did not report SERVING within {timeout_s:.0f}s (last: {last})")
            time.sleep(_POLL_S)


@dataclass
class Mesh:
    """Five running stage processes; ``entry`` is the address clients call."""

    run_dir: Path
    stages: dict[str, StageProcess] = field(default_factory=dict)
    # A command every stage runs under (e.g. ``taskset -c 0``: the bench's one-core runs).
    wrap: Sequence[str] = ()
    # The stages' TLS settings: how operator tools reach them.
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def entry(self) -> str:
        return self.stages[EDGE].address

    def address(self, stage: str) -> str:
        return self.stages[stage].address

    def spawn(self, name: str, env: Mapping[str, str], config: str | None, log_to_files: bool) -> StageProcess:
        log_path = self.run_dir / f"{name}.log" if log_to_files else None
        popen = spawn_stage(name, env, self.run_dir / f"{name}.ready", log_path, config, self.wrap)
        proc = StageProcess(name, popen, "", log_path, dict(env), config)
        self.stages[name] = proc
        return proc

    def wait_ready(self, proc: StageProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        info = wait_ready_file(proc.name, proc.popen, self.run_dir / f"{proc.name}.ready", proc.log_path, timeout_s)
        proc.address = info["address"]
        proc.metrics_address = info.get("metrics_address", "")
        proc.health_address = info.get("health_address", "")
        proc.admin_address = info.get("admin_address", "") or proc.address
        wait_healthy(proc.address, max(1.0, deadline - time.monotonic()), self.tls, proc.name)

    def channel(self, stage: str) -> grpc.Channel:
        """A blocking channel to ``stage`` for operator calls (health, admin), TLS or not as the mesh is."""
        return operator_channel(self.tls, self.address(stage), stage)

    def kill(self, name: str) -> None:
        """SIGKILL one stage (tests of failure handling)."""
        proc = self.stages[name]
        proc.popen.kill()
        proc.popen.wait()

    def restart(self, name: str, timeout_s: float = 30.0) -> None:
        """Start a stopped stage again on the same port, with the same settings."""
        old = self.stages[name]
        if old.popen.poll() is None:
            raise LaunchError(f"{name} stage is still running")
        env = dict(old.env)
        env[f"ORCH_{name.upper()}_PORT"] = str(old.port)
        proc = self.spawn(name, env, old.config, old.log_path is not None)
        self.wait_ready(proc, timeout_s)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM every stage, edge first so no new work flows down; SIGKILL what outlives the timeout."""
        for name in reversed(STAGES):
            proc = self.stages.get(name)
            if proc is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for name, proc in self.stages.items():
            try:
                codes[name] = proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[name] = proc.popen.wait()
        return codes


def start_mesh(
    run_dir: Path,
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    log_to_files: bool = True,
    timeout_s: float = 30.0,
    wrap: Sequence[str] = (),
) -> Mesh:
    """Start the stages in data-flow order (RAG first, the edge last).

    Each stage binds the port its config gives (0: any free port, reported through a
    ready file) and is told where its callee listens through ``ORCH_<CALLEE>_REPLICAS``.
    On any failure, the stages already started are stopped before raising.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    try:
        tls = load_config(config, base_env).tls
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    mesh = Mesh(run_dir, wrap=wrap, tls=tls)
    try:
        for name in STAGES:
            stage_env = dict(base_env)
            callee = CALLEE.get(name)
            if callee is not None:
                stage_env[f"ORCH_{callee.upper()}_REPLICAS"] = mesh.address(callee)
            proc = mesh.spawn(name, stage_env, config, log_to_files)
            mesh.wait_ready(proc, timeout_s)
    except BaseException:
        mesh.stop(timeout_s=5.0)
        raise
    return mesh
