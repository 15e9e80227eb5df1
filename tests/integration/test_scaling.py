"""A stage's replicas change under load (what DNS discovery does): replicas added take exactly their rendezvous
share of the sessions, a replica removed finishes its streams, and no request fails."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.config import load_config
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.server import RunningStage, start_stage
from orchestrator.stages import inference
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError
from tests.integration.conftest import poll, start_all

SLOW = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "5"}
SESSIONS = [f"s{i}" for i in range(48)]


async def start_inference(assemble: RunningStage) -> RunningStage:
    env = SLOW | {"ORCH_ASSEMBLE_ENDPOINTS": assemble.address}  # its own calls go to the mesh's assemble stage
    return await start_stage(inference.build(load_config(env=env), Telemetry()), "127.0.0.1", 0)


@pytest.mark.parametrize("links", ["true", "false"])
async def test_replicas_join_and_leave_under_load_with_no_failure_and_minimal_moves(links: str) -> None:
    running = await start_all(SLOW | {"ORCH_SERVER_STAGE_LINKS": links})
    a, b = await start_inference(running["assemble"]), await start_inference(running["assemble"])
    replicas = running["post"].app.downstream.replicas  # type: ignore[union-attr]
    replicas.update([a.address, b.address])  # in place of the one the mesh started with
    c: RunningStage | None = None
    served: dict[str, str] = {}
    errors: list[OrchestratorRpcError] = []
    stop = asyncio.Event()
    generation = [0]  # bumped at each change of replicas: answers to requests sent before it do not count

    async def load(client: AsyncOrchestratorClient, worker: int) -> None:
        n = worker
        while not stop.is_set():
            session = SESSIONS[n % len(SESSIONS)]
            n += 7
            started_in = generation[0]
            try:
                result = await client.complete("How do replicas share sessions?", session=session, max_tokens=12)
            except OrchestratorRpcError as err:
                errors.append(err)
                continue
            if started_in == generation[0]:  # sent after the last change of replicas
                served[session] = next(t.replica for t in result.completion.timings if t.stage == "inference")

    async def settled(live: list[str]) -> None:
        """Every session answered by its rendezvous owner among ``live``."""
        generation[0] += 1
        served.clear()
        await poll(lambda: len(served) == len(SESSIONS), timeout_s=20)
        owners = {s: rendezvous_order(s, live)[0] for s in SESSIONS}
        assert served == owners

    try:
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            workers = [asyncio.create_task(load(client, w)) for w in range(12)]
            await settled([a.address, b.address])
            before = dict(served)

            c = await start_inference(running["assemble"])  # scale up: 2 -> 3
            replicas.update([a.address, b.address, c.address])
            await settled([a.address, b.address, c.address])
            moved = {s for s in SESSIONS if served[s] != before[s]}
            assert moved == {s for s in SESSIONS if served[s] == c.address}  # only to the new replica
            assert 0 < len(moved) < len(SESSIONS) / 2

            # Scale down: 3 -> 2. The replica that leaves takes no new call and finishes the ones it has.
            b_before = b.app.runtime.outcomes.ok
            in_flight = b.app.runtime.in_flight
            replicas.update([a.address, c.address])
            await settled([a.address, c.address])
            await poll(lambda: b.app.runtime.in_flight == 0, timeout_s=10)
            assert b.app.runtime.outcomes.ok >= b_before + in_flight - 1
            assert b.app.runtime.outcomes.cancelled == 0 and b.app.runtime.outcomes.failed == 0
            stop.set()
            await asyncio.gather(*workers)
        assert errors == []
        counts = Counter(served.values())
        assert set(counts) == {a.address, c.address}
    finally:
        stop.set()
        for stage in [*reversed(running.values()), a, b, *([c] if c else [])]:
            await stage.stop(0)
