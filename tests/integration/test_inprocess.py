"""The five stage servers on port 0 inside the test's event loop, called over real gRPC."""

from __future__ import annotations

import asyncio
import gc
import types
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf.message import Message

from orchestrator.core.config import load_config
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.server import RunningStage, start_stage
from orchestrator.stages import rag
from orchestrator.stages.local import LocalPipeline
from orchestrator.v1 import admin_pb2, admin_pb2_grpc
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError, build_request
from tests.integration.conftest import poll, sample, start_all


async def test_grpc_mesh_matches_the_local_pipeline(stages: dict[str, RunningStage]) -> None:
    inputs = [("alice", "What is session affinity?"), ("bob", "How do stop sequences work?")]
    local = LocalPipeline(load_config(env={}))
    async with AsyncOrchestratorClient(stages["stream"].address) as client:
        for session, text in inputs:
            remote = await client.complete(text, session=session, max_tokens=30, stop=["Question"])
            expected = [
                c async for c in local.submit(build_request(text, session=session, max_tokens=30, stop=["Question"]))
            ]
            assert remote.text == "".join(c.text for c in expected)
            assert remote.completion.finish_reason == expected[-1].completion.finish_reason
            assert remote.completion.usage == expected[-1].completion.usage


@pytest.mark.parametrize(
    "stages",
    [{"ORCH_RAG_QUEUE_CAPACITY": "0", "ORCH_RAG_CONCURRENCY": "1", "ORCH_RAG_SIMULATED_DELAY_MS": "300"}],
    indirect=True,
)
async def test_shed_at_the_far_end_reaches_the_client_with_its_stage(stages: dict[str, RunningStage]) -> None:
    async with AsyncOrchestratorClient(stages["stream"].address) as client:
        first = asyncio.create_task(client.complete("one", session="a", max_tokens=2))
        await poll(lambda: stages["rag"].app.runtime.admission.active == 1)  # it holds the only RAG slot for 300 ms
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("two", session="b", max_tokens=2)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.stage == "rag"
        assert (await first).completion.usage.completion_tokens == 2
    assert stages["rag"].app.runtime.admission.stats.shed == 1
    # Upstream stages passed the shed on; none of them counted it as their own.
    assert stages["assemble"].app.runtime.admission.stats.shed == 0
    # In the metrics too: "shed" where it happened, "shed_below" at each stage it passed through.
    assert sample(stages["rag"], "requests_total", stage="rag", outcome="shed") == 1
    for name in ("assemble", "inference", "post", "stream"):
        assert sample(stages[name], "requests_total", stage=name, outcome="shed") == 0, name
        assert sample(stages[name], "requests_total", stage=name, outcome="shed_below") == 1, name


@pytest.mark.parametrize("stages", [{"ORCH_RAG_ENDPOINTS": "127.0.0.1:1"}], indirect=True)
async def test_unreachable_downstream_is_unavailable(stages: dict[str, RunningStage]) -> None:
    # Assemble is pointed at a port where nothing listens.
    async with AsyncOrchestratorClient(stages["stream"].address) as client:
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("hello", session="s", max_tokens=2, timeout=10)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.stage == "rag"


async def test_unreachable_replica_falls_back_to_the_next_one() -> None:
    # Two RAG "replicas": one dead port and the real one. Sessions whose rendezvous
    # choice is the dead one must be served by the live one; none may fail.
    from orchestrator.core.affinity import rendezvous_order

    live = await start_stage(rag.build(load_config(env={}), Telemetry()), "127.0.0.1", 0)
    replicas = f"127.0.0.1:1,{live.address}"
    running = await start_all({"ORCH_RAG_ENDPOINTS": replicas})
    try:
        sessions = [f"s{i}" for i in range(12)]
        first_choices = {rendezvous_order(s, replicas.split(","))[0] for s in sessions}
        assert "127.0.0.1:1" in first_choices  # the test really exercises the fallback
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            for s in sessions:
                result = await client.complete("What is rendezvous hashing?", session=s, max_tokens=3, timeout=10)
                assert result.completion.usage.completion_tokens == 3
        assert live.app.runtime.outcomes.ok == len(sessions)
    finally:
        for stage in [*reversed(running.values()), live]:
            await stage.stop(0)


@pytest.mark.parametrize(
    "stages", [{"ORCH_SERVER_STAGE_LINKS": "true"}, {"ORCH_SERVER_STAGE_LINKS": "false"}], indirect=True
)
async def test_completed_and_cancelled_requests_leave_no_reference_cycles(stages: dict[str, RunningStage]) -> None:
    # Objects in a cycle wait for a full collection, and under load those pauses are the shed tail:
    # every request's objects must be freed by reference counting, whatever its outcome.
    async def requests(client: AsyncOrchestratorClient) -> None:
        for i in range(20):
            await client.complete("What is session affinity?", session=f"s{i}", max_tokens=4)
        for i in range(5):
            call = client.submit_request(build_request("cancel me", session=f"c{i}", max_tokens=500))
            await anext(call)
            await call.aclose()

    assert not await _ours_in_cycles(stages, requests)


@pytest.mark.parametrize(
    "stages",
    [
        {"ORCH_SERVER_STAGE_LINKS": links, f"ORCH_{stage}_QUEUE_CAPACITY": "0", f"ORCH_{stage}_CONCURRENCY": "1"}
        | {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "50"}
        for links in ("true", "false")
        for stage in ("STREAM", "INFERENCE")
    ],
    indirect=True,
)
async def test_shed_requests_leave_no_reference_cycles(stages: dict[str, RunningStage]) -> None:
    async def requests(client: AsyncOrchestratorClient) -> None:
        hold = asyncio.create_task(client.complete("hold the slot", session="h", max_tokens=6))
        await poll(lambda: stages["inference"].app.runtime.admission.active == 1)  # the one slot is held
        for i in range(10):
            try:
                await client.complete("shed me", session=f"x{i}", max_tokens=2)
            except OrchestratorRpcError as err:  # not pytest.raises: its ExceptionInfo would make a cycle here
                codes.append(err.code)
        await hold

    codes: list[grpc.StatusCode] = []

    assert not await _ours_in_cycles(stages, requests)
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10


async def _ours_in_cycles(
    stages: dict[str, RunningStage], requests: Callable[[AsyncOrchestratorClient], Awaitable[None]]
) -> Counter[str]:
    """Types of this project's, gRPC's aio and protobuf objects that ``requests`` left in reference
    cycles. (grpc.aio's server leaves a few objects of its own in a cycle per call; not ours.)"""
    async with AsyncOrchestratorClient(stages["stream"].address) as client:
        await client.complete("warm up", session="w", max_tokens=2)
        gc.collect()
        gc.disable()
        try:
            await requests(client)
            await poll(lambda: all(s.app.runtime.in_flight == 0 for s in stages.values()))
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            return Counter(type(o).__qualname__ for o in gc.garbage if _is_ours(o))
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()


def _is_ours(obj: object) -> bool:
    kind = type(obj)
    return (
        kind.__module__.startswith(("orchestrator", "grpc.aio"))
        or isinstance(obj, (Message, types.FrameType, types.CoroutineType, types.AsyncGeneratorType))
        or kind.__name__ in ("_ServicerContext", "RPCState", "partial")
    )


async def test_reload_of_a_stage_with_nothing_to_reload_is_unimplemented(stages: dict[str, RunningStage]) -> None:
    async with grpc.aio.insecure_channel(stages["rag"].address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin_pb2_grpc.AdminServiceStub(channel).Reload(admin_pb2.ReloadRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "the rag stage has nothing to reload"
