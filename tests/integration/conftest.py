"""In-process fixtures: the five stage servers on port 0 inside the test's event loop, called over real gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from orchestrator.core.config import load_config
from orchestrator.core.graph import CALLEE, STAGES
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.server import RunningStage, start_stage
from orchestrator.stages import module


async def poll(check: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Wait, without blocking the loop the servers run on, until ``check()`` is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def start_all(env: dict[str, str]) -> dict[str, RunningStage]:
    """Every stage of the graph, each told where its callee listens, with ``env`` as its ORCH_* settings."""
    running: dict[str, RunningStage] = {}
    for name in STAGES:
        stage_env = dict(env)
        if name in CALLEE:
            stage_env.setdefault(f"ORCH_{CALLEE[name].upper()}_ENDPOINTS", running[CALLEE[name]].address)
        app = module(name).build(load_config(env=stage_env), Telemetry())
        running[name] = await start_stage(app, "127.0.0.1", 0)
    return running


@pytest.fixture
async def stages(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, RunningStage]]:
    """The stages, with the test's parameter (if any) as their settings; stopped afterwards."""
    running = await start_all(getattr(request, "param", {}))
    yield running
    for stage in reversed(running.values()):
        await stage.stop(0)


def sample(where: RunningStage, metric: str, /, **labels: str) -> float | None:
    """The value of ``orchestrator_<metric>{labels}`` in a stage's own registry (None: no such series)."""
    registry = where.app.runtime.telemetry.metrics.registry
    return registry.get_sample_value(f"orchestrator_{metric}", labels)
