"""Shared fixtures: meshes of real stage processes on free loopback ports."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from orchestrator.config import STAGES
from orchestrator.launcher import Mesh, start_mesh
from orchestrator.v1 import admin_pb2, admin_pb2_grpc

T = TypeVar("T")


def mesh_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without ORCH_* settings, every stage on port 0, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "OTEL_"))}
    env.update({f"ORCH_{name.upper()}_PORT": "0" for name in STAGES})
    env.update({f"ORCH_{name.upper()}_METRICS_PORT": "0" for name in STAGES})
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


def stage_status(address: str) -> admin_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        reply: admin_pb2.GetStatusResponse = admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
            admin_pb2.GetStatusRequest(), timeout=5
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
