"""The client side of a multi-host scenario, run on a host of its own (``python -m tests.multihost.client``).

It gets its scenario as JSON on the command line, does what a client would (and, as root, applies the network
faults the scenario calls for to other hosts' namespaces), and prints one JSON object of what it saw.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.core.affinity import rendezvous_order
from orchestrator.v1 import admin_pb2, admin_pb2_grpc
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError, tls_credentials
from tests.multihost import netns


def credentials(spec: dict[str, Any], name: str = "client") -> grpc.ChannelCredentials:
    """The mesh's CA and a certificate: a client's, or (operator tools) the edge's."""
    certs = spec["certs"]
    return tls_credentials(f"{certs}/ca.pem", f"{certs}/{name}.pem", f"{certs}/{name}.key")


def edge_client(spec: dict[str, Any]) -> AsyncOrchestratorClient:
    """A client of the edge, which it dials by address and checks by the name its certificate carries."""
    options = (("grpc.ssl_target_name_override", "stream"),)
    return AsyncOrchestratorClient(spec["edge"], credentials=credentials(spec), options=options)


def stage_channel(spec: dict[str, Any], address: str, stage: str) -> grpc.aio.Channel:
    """A channel for operator calls (health, admin) to the ``stage`` process at ``address``."""
    options = (("grpc.ssl_target_name_override", stage),)
    return grpc.aio.secure_channel(address, credentials(spec, "stream"), options=options)


async def timed(client: AsyncOrchestratorClient, session: str, tokens: int) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = await client.complete(
            "What happens when a host goes silent?", session=session, max_tokens=tokens, timeout=30
        )
    except OrchestratorRpcError as err:
        return {"session": session, "error": err.code.name, "stage": err.stage, "s": time.monotonic() - started}
    return {"session": session, "model": result.completion.model, "s": time.monotonic() - started}


async def wait_ready(spec: dict[str, Any]) -> None:
    """Until the edge reports SERVING (it does once every stage below it is up)."""
    deadline = time.monotonic() + 30
    async with stage_channel(spec, spec["edge"], "stream") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec['edge']} did not report SERVING")
            await asyncio.sleep(0.2)


async def long_stream(client: AsyncOrchestratorClient, session: str, t0: list[float]) -> dict[str, Any]:
    """A stream that is under way when the partition starts: how and when it ends, from the partition on."""
    stream = client.submit("Stream for a while, please.", session=session, max_tokens=400, timeout=60)
    await anext(stream)
    try:
        async for _ in stream:
            pass
    except OrchestratorRpcError as err:
        return {"session": session, "error": err.code.name, "stage": err.stage, "after_s": time.monotonic() - t0[0]}
    return {"session": session, "error": "", "after_s": time.monotonic() - t0[0]}


async def partition(spec: dict[str, Any]) -> dict[str, Any]:
    """Partition one of two inference replicas while its sessions keep sending; heal; see them come back."""
    a, b = spec["replicas"]
    owner = {a: spec["names"][0], b: spec["names"][1]}
    sessions = [f"p{i}" for i in range(100)]
    on_a = [s for s in sessions if rendezvous_order(s, [a, b])[0] == a][:5]
    on_b = [s for s in sessions if rendezvous_order(s, [a, b])[0] == b][:5]
    out: dict[str, Any] = {}
    async with edge_client(spec) as client:
        await wait_ready(spec)
        out["before"] = [await timed(client, s, 8) for s in on_a + on_b]
        t0 = [0.0]
        streams = [asyncio.create_task(long_stream(client, s, t0)) for s in on_a[:4]]
        await asyncio.sleep(0.5)  # under way
        netns.partition(spec["victim_ns"])
        t0[0] = time.monotonic()
        await asyncio.sleep(1.0)
        out["during"] = await asyncio.gather(*(timed(client, s, 8) for s in on_a + on_b))
        out["streams"] = await asyncio.gather(*streams)
        netns.heal(spec["victim_ns"])
        healed = time.monotonic()
        while True:
            back = [await timed(client, s, 2) for s in on_a]
            if all(r.get("model") == owner[a] for r in back) or time.monotonic() - healed > 20:
                break
            await asyncio.sleep(0.2)
        out["after"] = back
        out["back_after_s"] = time.monotonic() - healed
    return out


async def hold(spec: dict[str, Any]) -> dict[str, Any]:
    """Start requests and keep them open until this host is cut off (the test does that): a client that
    vanishes. Prints once they are under way."""
    async with edge_client(spec) as client:
        await wait_ready(spec)
        # An input that retrieves documents: the echo worker's answer is the long prompt they make.
        question = "How do streaming, backpressure and load shedding work together?"
        streams = [client.submit(question, session=f"v{i}", max_tokens=400, timeout=120) for i in range(spec["n"])]
        if spec["first_chunk"]:
            for stream in streams:
                await anext(stream)
            tasks = [asyncio.create_task(_drain(s)) for s in streams]
        else:
            tasks = [asyncio.create_task(_drain(s)) for s in streams]
            await asyncio.sleep(1.0)  # the requests are waiting for their first token now
        print(json.dumps({"under_way": True}), flush=True)
        await asyncio.wait(tasks, timeout=spec["hold_s"])
    return {}


async def _drain(stream: Any) -> None:
    try:
        async for _ in stream:
            pass
    except (OrchestratorRpcError, grpc.aio.AioRpcError):
        pass


async def lossy(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests through a host that loses a share of its packets."""
    async with edge_client(spec) as client:
        await wait_ready(spec)
        out = {"clean": [await timed(client, f"l{i}", 8) for i in range(spec["n"])]}
        netns.loss(spec["lossy_ns"], spec["percent"])
        out["lossy"] = [await timed(client, f"l{i}", 8) for i in range(spec["n"])]
    return out


async def watch(spec: dict[str, Any]) -> dict[str, Any]:
    """Poll a stage's status until its worker generates nothing and it has counted ``cancelled`` calls as
    cancelled: when the worker went idle (monotonic clock, shared by every process on the machine) and how the
    stage counted its requests. A call's outcome is counted as its handler unwinds, just after the worker stops,
    so the two are waited for separately."""
    async with stage_channel(spec, spec["address"], "inference") as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deadline = time.monotonic() + spec["timeout_s"]
        idle_at = None
        while True:
            status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=2)
            if idle_at is None and status.worker.active == 0:
                idle_at = time.monotonic()
            counted = status.counters.cancelled >= spec.get("cancelled", 0)
            if (idle_at is not None and counted) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return {
            "idle_at": idle_at if idle_at is not None else time.monotonic(),
            "active": status.worker.active,
            "cancelled": status.counters.cancelled,
            "failed": status.counters.failed,
            "ok": status.counters.ok,
        }


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests from many sessions, ``spec["workers"]`` at a time, until stdin says ``stop``: when each was sent
    (monotonic clock, shared by every process on the machine), its session, and the inference replica that
    answered or the error."""
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    sessions = [f"u{i}" for i in range(spec["sessions"])]

    async def worker(w: int) -> None:
        n = w
        while not stop.is_set():
            session = sessions[n % len(sessions)]
            n += spec["workers"]
            sent = time.monotonic()
            try:
                result = await client.complete("Who answers me now?", session=session, max_tokens=8, timeout=30)
            except OrchestratorRpcError as err:
                samples.append({"t": sent, "session": session, "error": f"{err.code.name} {err.stage} {err.message}"})
                continue
            replica = next(t.replica for t in result.completion.timings if t.stage == "inference")
            samples.append({"t": sent, "session": session, "replica": replica, "done": time.monotonic()})

    async with edge_client(spec) as client:
        await wait_ready(spec)
        tasks = [asyncio.create_task(worker(w)) for w in range(spec["workers"])]
        print(json.dumps({"under_way": True}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        stop.set()
        await asyncio.gather(*tasks)
    return {"samples": samples}


async def callees(spec: dict[str, Any]) -> dict[str, Any]:
    """Poll a stage's status until the replicas it calls are exactly ``spec["expect"]``: when that was first so."""
    async with stage_channel(spec, spec["address"], spec["stage"]) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        deadline = time.monotonic() + spec["timeout_s"]
        while True:
            status = await admin.GetStatus(admin_pb2.GetStatusRequest(), timeout=2)
            known = sorted(c.address for c in status.callees)
            if known == sorted(spec["expect"]) or time.monotonic() > deadline:
                return {"at": time.monotonic(), "callees": known}
            await asyncio.sleep(0.05)


SCENARIOS = {
    "partition": partition,
    "hold": hold,
    "lossy": lossy,
    "watch": watch,
    "load": load,
    "callees": callees,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(SCENARIOS[spec["scenario"]](spec))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
