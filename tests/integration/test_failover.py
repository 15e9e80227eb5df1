"""Replicas that stop answering are ejected and their sessions fail over; they come back when they answer again.
In process: a replica that accepts connections and then says nothing (what a silent partition looks like to a
caller), and a real replica whose health is turned NOT_SERVING and back. The multi-host tier does it with real
network faults."""

from __future__ import annotations

import asyncio
import time

import pytest

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.config import load_config
from orchestrator.core.graph import CALLEE
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.server import start_stage
from orchestrator.stages import rag
from orchestrator_client import AsyncOrchestratorClient
from tests.integration.conftest import poll, sample, start_all


class Freezer:
    """A TCP proxy in front of a replica that can go silent: frozen, it stops passing bytes either way and closes
    nothing, which is what a partition looks like to the connections already open through it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.address = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Freezer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            dst.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()


def sessions_owned_by(address: str, replicas: list[str], n: int) -> list[str]:
    return [s for s in (f"s{i}" for i in range(200)) if rendezvous_order(s, replicas)[0] == address][:n]


@pytest.mark.parametrize("links", ["true", "false"])
async def test_a_replica_gone_silent_is_ejected_and_its_sessions_fail_over(links: str) -> None:
    a = await start_stage(rag.build(load_config(env={}), Telemetry()), "127.0.0.1", 0)
    b = await start_stage(rag.build(load_config(env={}), Telemetry()), "127.0.0.1", 0)
    freezer = await Freezer(a.address).start()
    replicas = [freezer.address, b.address]
    running = await start_all({"ORCH_RAG_ENDPOINTS": ",".join(replicas), "ORCH_SERVER_STAGE_LINKS": links})
    try:
        owned = sessions_owned_by(freezer.address, replicas, 4)
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            for s in owned:  # connections to both replicas open, the first one through the proxy
                await client.complete("Who serves me?", session=s, max_tokens=2, timeout=10)
            assert a.app.runtime.outcomes.ok == len(owned)
            freezer.flowing.clear()
            # Sent after the replica went silent: they wait on it until it is ejected, then move on.
            started = time.monotonic()
            moved = await asyncio.gather(
                *(client.complete("What is failover?", session=s, max_tokens=3, timeout=20) for s in owned)
            )
            waited = time.monotonic() - started
            assert all(r.completion.usage.completion_tokens == 3 for r in moved)
            # Ejected within health_interval + health_timeout (0.5 s + 1 s), before keepalive (1.5 s + 1.5 s) would.
            assert waited < 2.5, waited
            assert sample(running["assemble"], "replicas_ejected", stage="rag") == 1
            assert sample(running["assemble"], "replica_ejections_total", stage="rag") == 1
            # Once it is ejected, the same sessions go straight to the other replica.
            started = time.monotonic()
            for s in owned:
                await client.complete("And now?", session=s, max_tokens=3, timeout=20)
            assert (time.monotonic() - started) / len(owned) < 0.5
            assert b.app.runtime.outcomes.ok == 2 * len(owned)
            # It answers again: readmitted, and its sessions return to it.
            freezer.flowing.set()
            await poll(lambda: sample(running["assemble"], "replicas_ejected", stage="rag") == 0, timeout_s=10)
            for s in owned:
                await client.complete("Back home?", session=s, max_tokens=2, timeout=10)
            assert b.app.runtime.outcomes.ok == 2 * len(owned)
    finally:
        for stage in [*reversed(running.values()), a, b]:
            await stage.stop(0)
        await freezer.close()


async def test_a_replica_that_answers_not_serving_takes_no_new_calls_until_it_serves_again() -> None:
    a = await start_stage(rag.build(load_config(env={}), Telemetry()), "127.0.0.1", 0)
    b = await start_stage(rag.build(load_config(env={}), Telemetry()), "127.0.0.1", 0)
    replicas = [a.address, b.address]
    running = await start_all({"ORCH_RAG_ENDPOINTS": ",".join(replicas)})
    assemble = running["assemble"]
    try:
        owned = sessions_owned_by(a.address, replicas, 3)
        async with AsyncOrchestratorClient(running["stream"].address) as client:

            async def ask() -> None:
                for s in owned:
                    await client.complete("Who serves me?", session=s, max_tokens=2, timeout=10)

            await ask()
            assert (a.app.runtime.outcomes.ok, b.app.runtime.outcomes.ok) == (3, 0)
            await a.set_serving(False)  # what a draining replica, or one whose breaker is open, answers
            await poll(lambda: sample(assemble, "replicas_ejected", stage="rag") == 1, timeout_s=5)
            await ask()
            assert (a.app.runtime.outcomes.ok, b.app.runtime.outcomes.ok) == (3, 3)
            await a.set_serving(True)
            await poll(lambda: sample(assemble, "replicas_ejected", stage="rag") == 0, timeout_s=5)
            await ask()
            assert (a.app.runtime.outcomes.ok, b.app.runtime.outcomes.ok) == (6, 3)  # back to their owner
    finally:
        for stage in [*reversed(running.values()), a, b]:
            await stage.stop(0)


@pytest.mark.parametrize(("rag_keepalive_s", "reopened"), [("1", False), ("60", True)], ids=["agreed", "stricter"])
async def test_idle_links_are_not_cut_for_pinging(rag_keepalive_s: str, reopened: bool) -> None:
    """Callers ping every keepalive_time_s, idle or not; a server permits pings twice that often, so an idle
    link stays up. The window is compressed: a ping a second (gRPC's most) for 4.5 s, where gRPC's default
    policy (one ping in five minutes without data) answers the third with GOAWAY too_many_pings. The control: a
    RAG stage configured with a far longer keepalive permits far fewer pings, and cuts its link."""
    rag_env = {"ORCH_NETWORK_KEEPALIVE_TIME_S": rag_keepalive_s}
    callee = await start_stage(rag.build(load_config(env=rag_env), Telemetry()), "127.0.0.1", 0)
    running = await start_all({"ORCH_RAG_ENDPOINTS": callee.address, "ORCH_NETWORK_KEEPALIVE_TIME_S": "1"})
    try:
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            await client.complete("open the links", session="k", max_tokens=2, timeout=10)
            await asyncio.sleep(4.5)  # idle: only pings cross the links now
            await client.complete("still the same links?", session="k", max_tokens=2, timeout=10)
        opens = {
            callee: sample(running[caller], "link_opens_total", callee=callee) for caller, callee in CALLEE.items()
        }
        assert opens == {"assemble": 1, "inference": 1, "post": 1, "rag": 2 if reopened else 1}, opens
    finally:
        for stage in [*reversed(running.values()), callee]:
            await stage.stop(0)
