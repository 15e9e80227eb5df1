"""A stage that dies or drains: callers get a prompt, clear status; the mesh recovers."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.launcher import Mesh
from orchestrator_client import OrchestratorRpcError
from tests.conftest import colocated, mesh_channel, mesh_client, poll

pytestmark = pytest.mark.mesh

LONG_INPUT = "explain graceful shutdown and health checking " * 60


async def test_killed_stage_gives_unavailable_then_recovers(fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20")
    async with mesh_client(m.entry) as client:
        stream = client.submit(LONG_INPUT, session="victim", max_tokens=400, timeout=60)
        first = await anext(stream)
        assert first.text
        killed_at = time.monotonic()
        m.kill("inference")
        with pytest.raises(OrchestratorRpcError) as info:
            async for _ in stream:
                pass
        failed_after_s = time.monotonic() - killed_at
        print(f"\nclient saw {info.value.code.name} {failed_after_s * 1000:.1f} ms after the kill")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        # The edge names the stage it lost; when the edge shares the killed process, the connection itself is gone.
        assert info.value.stage == ("" if colocated(m, "inference", "stream") else "inference")
        assert failed_after_s < 2.0

        # New requests fail fast while the stage is down ...
        started = time.monotonic()
        with pytest.raises(OrchestratorRpcError) as down:
            await client.complete("anyone there?", session="victim", max_tokens=3, timeout=10)
        assert down.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2.0

        # ... and succeed again once it is back on its port.
        m.restart("inference")

        async def served() -> bool:
            try:
                await client.complete("back again?", session="victim", max_tokens=3, timeout=5)
                return True
            except OrchestratorRpcError:
                return False

        deadline = time.monotonic() + 20
        while not await served():
            assert time.monotonic() < deadline, "the mesh did not recover after the restart"
            await asyncio.sleep(0.05)


def _health(address: str) -> int:
    with mesh_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return int(reply.status)
        except grpc.RpcError:
            return -1


async def test_sigterm_drains_in_flight_streams(fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="5", ORCH_SERVER_DRAIN_GRACE_S="20")
    edge = m.stages["stream"]
    async with mesh_client(m.entry) as client:
        stream = client.submit(LONG_INPUT, session="drain", max_tokens=200, timeout=60)
        chunks = [await anext(stream)]
        edge.popen.send_signal(signal.SIGTERM)
        # The in-flight stream runs to its end within the grace period ...
        async for chunk in stream:
            chunks.append(chunk)
        assert chunks[-1].completion.usage.completion_tokens == 200
    # ... and the process exits cleanly once it is done.
    assert await asyncio.to_thread(edge.popen.wait, 20) == 0
    assert _health(m.entry) == -1


async def test_draining_stage_reports_not_serving(fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20", ORCH_SERVER_DRAIN_GRACE_S="20")
    post = m.stages["post"]
    assert _health(post.address) == health_pb2.HealthCheckResponse.SERVING
    async with mesh_client(m.entry) as client:
        stream = client.submit(LONG_INPUT, session="drain", max_tokens=100, timeout=60)
        await anext(stream)
        post.popen.send_signal(signal.SIGTERM)
        poll(
            lambda: _health(post.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
            what="post to report NOT_SERVING while draining",
        )
        rest = [c async for c in stream]
        assert rest[-1].completion.usage.completion_tokens == 100
    assert await asyncio.to_thread(post.popen.wait, 20) == 0
