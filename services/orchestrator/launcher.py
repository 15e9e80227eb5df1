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

from orchestrator.core.config import ConfigError, StageConfig, TlsConfig, load_config
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
    # Which replica of its stage (0: the first).
    index: int = 0
    # The stages that share its process (a colocated layout), else empty.
    group: tuple[str, ...] = ()
    health_address: str = ""
    # AdminService's own listener, when the stage has one (``<stage>.admin_port``); else its address.
    admin_address: str = ""
    # The file the process writes once serving (a further replica of a group writes in its own folder).
    ready: Path | None = None

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def key(self) -> str:
        """The replica's name: its stage's, with its index after the first (``inference-1``)."""
        return self.name if self.index == 0 else f"{self.name}-{self.index}"


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
    return _popen(argv, config, env, log_path)


def _popen(
    argv: list[str], config: str | None, env: Mapping[str, str], log_path: Path | None
) -> subprocess.Popen[bytes]:
    """Start a stage process with its stderr appended to ``log_path`` (inherited when None)."""
    if config:
        argv = [*argv, "--config", config]
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
    """The running stage processes, each stage's replicas in order; ``entry`` is the address clients call."""

    run_dir: Path
    replicas: dict[str, list[StageProcess]] = field(default_factory=dict)
    # A command every stage runs under (e.g. ``taskset -c 0``: the bench's one-core runs).
    wrap: Sequence[str] = ()
    # The stages' TLS settings: how operator tools reach them.
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def stages(self) -> dict[str, StageProcess]:
        """Each stage's first replica."""
        return {name: procs[0] for name, procs in self.replicas.items() if procs}

    @property
    def entry(self) -> str:
        return self.stages[EDGE].address

    @property
    def clients_target(self) -> str:
        """A gRPC target naming every edge replica (``ipv4:A,B``; with the round_robin policy a client spreads its
        calls over them), or the one edge's address."""
        edges = self.addresses(EDGE)
        if len(edges) > 1 and all(a.split(":")[0].replace(".", "").isdigit() for a in edges):
            return "ipv4:" + ",".join(edges)
        return self.entry

    def address(self, stage: str) -> str:
        return self.stages[stage].address

    def addresses(self, stage: str) -> list[str]:
        """Where every replica of ``stage`` listens."""
        return [proc.address for proc in self.replicas.get(stage, [])]

    def spawn(
        self, name: str, env: Mapping[str, str], config: str | None, log_to_files: bool, index: int = 0
    ) -> StageProcess:
        """Start replica ``index`` of the stage ``name`` (the first replica keeps the stage's own file names)."""
        key = name if index == 0 else f"{name}-{index}"
        log_path = self.run_dir / f"{key}.log" if log_to_files else None
        ready = self.run_dir / f"{key}.ready"
        popen = spawn_stage(name, env, ready, log_path, config, self.wrap)
        return self._place(StageProcess(name, popen, "", log_path, dict(env), config, index=index, ready=ready))

    def _place(self, proc: StageProcess) -> StageProcess:
        """Record ``proc`` as its stage's replica ``proc.index`` (replacing a restarted one)."""
        replicas = self.replicas.setdefault(proc.name, [])
        if proc.index < len(replicas):
            replicas[proc.index] = proc
        else:
            replicas.append(proc)
        return proc

    def spawn_group(
        self, group: Sequence[str], env: Mapping[str, str], config: str | None, log_to_files: bool, index: int = 0
    ) -> list[StageProcess]:
        """Start replica ``index`` of one process serving the adjacent stages of ``group`` (calls between them in
        memory)."""
        key = "+".join(group) + (f"-{index}" if index else "")
        log_path = self.run_dir / f"{key}.log" if log_to_files else None
        ready_dir = self.run_dir if index == 0 else self.run_dir / key
        ready_dir.mkdir(exist_ok=True)
        for name in group:
            (ready_dir / f"{name}.ready").unlink(missing_ok=True)
        argv = [*self.wrap, sys.executable, "-m", "orchestrator.stages.group", "+".join(group)]
        popen = _popen([*argv, "--ready-dir", str(ready_dir)], config, env, log_path)
        procs = []
        for name in group:
            ready = ready_dir / f"{name}.ready"
            proc = StageProcess(
                name, popen, "", log_path, dict(env), config, index=index, group=tuple(group), ready=ready
            )
            procs.append(self._place(proc))
        return procs

    def wait_ready(self, proc: StageProcess, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        assert proc.ready is not None, "a process this mesh started"
        info = wait_ready_file(proc.key, proc.popen, proc.ready, proc.log_path, timeout_s)
        proc.address = info["address"]
        proc.metrics_address = info.get("metrics_address", "")
        proc.health_address = info.get("health_address", "")
        proc.admin_address = info.get("admin_address", "") or proc.address
        wait_healthy(proc.address, max(1.0, deadline - time.monotonic()), self.tls, proc.name)

    def channel(self, stage: str) -> grpc.Channel:
        """A blocking channel to ``stage`` for operator calls (health, admin), TLS or not as the mesh is."""
        return operator_channel(self.tls, self.address(stage), stage)

    def kill(self, name: str, index: int = 0) -> None:
        """SIGKILL one replica of a stage (tests of failure handling)."""
        proc = self.replicas[name][index]
        proc.popen.kill()
        proc.popen.wait()

    def restart(self, name: str, timeout_s: float = 30.0, index: int = 0) -> None:
        """Start a stopped replica (or the process of its group) again on the same ports, with the same settings."""
        old = self.replicas[name][index]
        if old.popen.poll() is None:
            raise LaunchError(f"{old.key} stage is still running")
        env = dict(old.env)
        if old.group:
            env |= {f"ORCH_{s.upper()}_PORT": str(self.replicas[s][index].port) for s in old.group}
            procs = self.spawn_group(old.group, env, old.config, old.log_path is not None, index)
        else:
            env[f"ORCH_{name.upper()}_PORT"] = str(old.port)
            procs = [self.spawn(name, env, old.config, old.log_path is not None, index)]
        for proc in procs:
            self.wait_ready(proc, timeout_s)

    def stop(self, timeout_s: float = 20.0) -> dict[str, int]:
        """SIGTERM every process, edge first so no new work flows down; SIGKILL what outlives the timeout.
        Returns each process's exit code, by stage (``inference-1`` for a further replica)."""
        procs = [proc for name in reversed(STAGES) for proc in self.replicas.get(name, [])]
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        codes = {}
        for proc in procs:  # the stages of a group share a process and its exit code
            try:
                codes[proc.key] = proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.key] = proc.popen.wait()
        return codes


def _replica_env(env: dict[str, str], name: str, index: int, cfg: StageConfig) -> dict[str, str]:
    """A further replica's settings: a free port for each listener the first replica has at a fixed one."""
    if index == 0:
        return env
    up = name.upper()
    out = dict(env) | {f"ORCH_{up}_PORT": "0"}
    for setting, value in (
        ("METRICS_PORT", cfg.metrics_port),
        ("HEALTH_PORT", cfg.health_port),
        ("ADMIN_PORT", cfg.admin_port),
    ):
        if value > 0:
            out[f"ORCH_{up}_{setting}"] = "0"
    return out


def start_mesh(
    run_dir: Path,
    *,
    config: str | None = None,
    env: Mapping[str, str] | None = None,
    log_to_files: bool = True,
    timeout_s: float = 30.0,
    wrap: Sequence[str] = (),
) -> Mesh:
    """Start the stages in data-flow order (RAG first, the edge last), each stage's ``replicas`` processes at once,
    or (``server.layout``) one process per group of stages.

    The first replica binds the port its config gives (0: any free port, reported through a ready file), the
    others free ports; each stage is told where every replica of its callee listens through
    ``ORCH_<CALLEE>_ENDPOINTS``. On any failure, the processes already started are stopped before raising.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    try:
        cfg = load_config(config, base_env)
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None
    mesh = Mesh(run_dir, wrap=wrap, tls=cfg.tls)
    try:
        for group in cfg.groups():
            stage_env = dict(base_env)
            for name in group:  # where each callee outside the process listens (inside it: called in memory)
                callee = CALLEE.get(name)
                if callee is not None and callee not in group:
                    stage_env[f"ORCH_{callee.upper()}_ENDPOINTS"] = ",".join(mesh.addresses(callee))
            if len(group) > 1:
                procs = []
                for i in range(cfg.stage(group[0]).replicas):
                    group_env = stage_env
                    for name in group:
                        group_env = _replica_env(group_env, name, i, cfg.stage(name))
                    procs += mesh.spawn_group(group, group_env, config, log_to_files, i)
            else:
                own = cfg.stage(group[0])
                procs = [
                    mesh.spawn(group[0], _replica_env(stage_env, group[0], i, own), config, log_to_files, i)
                    for i in range(own.replicas)
                ]
            for proc in procs:
                mesh.wait_ready(proc, timeout_s)
    except BaseException:
        mesh.stop(timeout_s=5.0)
        raise
    return mesh
