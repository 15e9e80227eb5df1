"""One client can never fail another: limits that agree, sized link messages, bad bodies refused cleanly,
and outcomes that add up. The five stages on port 0 in the test's loop, called over real gRPC."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from orchestrator.core.graph import GRAPH, STAGES
from orchestrator.core.telemetry import OUTCOMES
from orchestrator.runtime.server import LIVENESS, RunningStage
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError, build_request
from tests.integration.conftest import poll, sample

LINK_OPEN = "/orchestrator.v1.LinkService/Open"


def link_losses(running: dict[str, RunningStage]) -> float:
    return sum(sample(s, "link_losses_total", callee=c) or 0.0 for s in running.values() for c in STAGES)


def large_request(i: int) -> object:
    # ~0.9 MB: the limits cap the number of meta entries; each value is 30 KB.
    return build_request("hi", session=f"big{i}", max_tokens=4, meta={f"k{k}": "x" * 30_000 for k in range(30)})


SLOW = {"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20", "ORCH_RAG_SIMULATED_DELAY_MS": "300"}
RAISED = {"ORCH_LIMITS_MAX_META_CHARS": "40000", "ORCH_LIMITS_MAX_REQUEST_BYTES": "2000000"}


@pytest.mark.parametrize(
    ("stages", "large_pass"), [(SLOW, False), (SLOW | RAISED, True)], indirect=["stages"], ids=["default", "raised"]
)
async def test_large_requests_never_break_a_link_another_client_shares(
    stages: dict[str, RunningStage], large_pass: bool
) -> None:
    """Eight ~0.9 MB requests at once beside ten small ones from another client. At the default limits the
    large ones are refused alone at the edge, naming the limit; with limits raised to let them in, their
    call frames add up to far more than one gRPC message, and the links split them instead of breaking."""
    entry = stages["stream"].address
    before = link_losses(stages)
    async with AsyncOrchestratorClient(entry) as big, AsyncOrchestratorClient(entry) as small:

        async def large(i: int) -> str:
            try:
                chunks = [c async for c in big.submit_request(large_request(i), timeout=30)]  # type: ignore[arg-type]
            except OrchestratorRpcError as err:
                assert not large_pass, err
                assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.stage == "stream"
                assert "limit is" in err.message
                return "refused"
            assert chunks[-1].completion.usage.completion_tokens > 0
            return "ok"

        async def little(i: int) -> str:
            result = await small.complete("What is backpressure?", session=f"s{i}", max_tokens=4, timeout=30)
            return "ok" if result.completion.usage.completion_tokens == 4 else "short"

        outcomes = await asyncio.gather(*(large(i) for i in range(8)), *(little(i) for i in range(10)))
    assert outcomes[8:] == ["ok"] * 10  # no small request failed
    assert outcomes[:8] == ["ok" if large_pass else "refused"] * 8
    assert link_losses(stages) == before  # no link was lost


def _bodies(rng: random.Random) -> list[bytes]:
    good = build_request("What is BM25?", session="fuzz", max_tokens=2).SerializeToString()
    bad_utf8 = build_request("AAAA", session="fuzz").SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc")
    out = [b"", b"\xff\xff", bad_utf8, good, good[: len(good) // 2], good + b"\x0a\xff"]
    out += [rng.randbytes(rng.randint(1, 400)) for _ in range(40)]
    out += [bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.05 else b for b in good) for _ in range(20)]
    return out


ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


async def _rpc(channel: grpc.aio.Channel, path: str, body: bytes) -> grpc.StatusCode:
    call = channel.unary_stream(path)(body, timeout=10)
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, (path, body[:40], err.code(), err.details())
        return err.code()
    return grpc.StatusCode.OK


async def _link(channel: grpc.aio.Channel, body: bytes) -> grpc.StatusCode:
    call = channel.stream_stream(LINK_OPEN)(timeout=10)
    await call.write(body)
    await call.done_writing()
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        assert err.code() in ALLOWED, (body[:40], err.code(), err.details())
        return err.code()
    return grpc.StatusCode.OK


async def test_corrupt_and_random_bodies_get_clean_statuses(stages: dict[str, RunningStage]) -> None:
    """Random, truncated and bit-flipped bodies to every stage's RPC and to every link: each answer is OK,
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never UNKNOWN or INTERNAL), the edge counts every call, and the
    mesh serves normally afterwards."""
    rng = random.Random(11)
    bodies = _bodies(rng)
    edge = stages["stream"]
    edge_before = sum(sample(edge, "requests_total", stage="stream", outcome=o) or 0.0 for o in OUTCOMES)
    codes: list[grpc.StatusCode] = []
    refused_links: dict[str, int] = {}
    for spec in GRAPH:
        async with grpc.aio.insecure_channel(stages[spec.name].address) as channel:
            for body in bodies:
                codes.append(await _rpc(channel, f"/{spec.full_service}/{spec.method}", body))
            for body in bodies[:15]:
                code = await _link(channel, body)
                codes.append(code)
                refused_links[spec.name] = refused_links.get(spec.name, 0) + (code == grpc.StatusCode.INVALID_ARGUMENT)
            # Over gRPC's message limit: refused before any stage code runs.
            codes.append(await _rpc(channel, f"/{spec.full_service}/{spec.method}", b"\x0a" + b"x" * 5_000_000))
    assert grpc.StatusCode.INVALID_ARGUMENT in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    # The edge accounted for every body that reached it (the over-limit one never does), and for every link it
    # refused.
    await poll(lambda: edge.app.runtime.in_flight == 0)
    edge_after = sum(sample(edge, "requests_total", stage="stream", outcome=o) or 0.0 for o in OUTCOMES)
    assert edge_after - edge_before == len(bodies) + refused_links["stream"]
    assert refused_links["stream"] > 0
    assert (sample(edge, "requests_total", stage="stream", outcome="invalid") or 0) > 0
    async with AsyncOrchestratorClient(edge.address) as client:
        result = await client.complete("still serving?", session="after", max_tokens=3, timeout=10)
    assert result.completion.usage.completion_tokens == 3


async def test_every_counter_series_exists_at_zero_from_the_start(stages: dict[str, RunningStage]) -> None:
    for name, stage in stages.items():
        for outcome in OUTCOMES:
            assert sample(stage, "requests_total", stage=name, outcome=outcome) == 0.0, (name, outcome)
        assert sample(stage, "shed_total", stage=name, reason="queue_full") == 0.0
    assert sample(stages["inference"], "link_losses_total", callee="assemble") == 0.0
    assert sample(stages["stream"], "affinity_total", stage="post", result="miss") == 0.0


async def test_bad_input_counts_as_invalid_not_as_an_error(stages: dict[str, RunningStage]) -> None:
    async with AsyncOrchestratorClient(stages["stream"].address) as client:
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("   ", session="c")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sample(stages["stream"], "requests_total", stage="stream", outcome="invalid") == 1
    assert sample(stages["stream"], "requests_total", stage="stream", outcome="error") == 0
    assert stages["stream"].app.runtime.status().counters.invalid == 1


async def test_reflection_answers_as_v1_too(stages: dict[str, RunningStage]) -> None:
    # v1 has v1alpha's messages under another package: the same bytes on the wire.
    async with grpc.aio.insecure_channel(stages["stream"].address) as channel:
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            call = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )()
            await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
            await call.done_writing()
            listed, described = [r async for r in call]
            names = {s.name for s in listed.list_services_response.service}
            assert {"orchestrator.v1.StreamService", "grpc.reflection.v1.ServerReflection"} <= names, service
            assert described.file_descriptor_response.file_descriptor_proto, service


@pytest.mark.parametrize("stages", [{"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20"}], indirect=True)
async def test_liveness_stays_serving_while_a_stage_drains(stages: dict[str, RunningStage]) -> None:
    edge = stages["stream"]
    async with AsyncOrchestratorClient(edge.address) as client, grpc.aio.insecure_channel(edge.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def status(service: str) -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            return int(reply.status)

        stream = client.submit("keep the edge busy while it drains", session="d", max_tokens=30)
        await anext(stream)
        draining = asyncio.create_task(edge.stop(10))
        await poll(lambda: edge.draining)
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("") == not_serving
        assert await status("orchestrator.v1.StreamService") == not_serving
        assert await status(LIVENESS) == serving
        assert [c async for c in stream][-1].completion.usage.completion_tokens == 30  # the open stream finishes
        await draining


@pytest.mark.parametrize("sized", [True, False], ids=["our-options", "grpc-defaults"])
async def test_a_burst_of_calls_is_not_cancelled_by_grpcs_backlog(sized: bool) -> None:
    """A server holding its calls, hit by 1,500 at once: with the backlog sized by server.max_pending_calls every
    call reaches the handler; with gRPC's defaults some are cancelled before it, unanswered by any code of ours."""
    from orchestrator.core.calls import server_options
    from orchestrator.core.config import load_config
    from orchestrator.runtime.server import new_server

    cfg = load_config(env={})
    server = new_server(server_options(cfg.server, cfg.network) if sized else ())
    release = asyncio.Event()
    entered = 0

    async def hold(request: bytes, context: object) -> AsyncIterator[bytes]:
        nonlocal entered
        entered += 1
        await release.wait()
        yield b"done"

    handler = grpc.unary_stream_rpc_method_handler(hold)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.Hold", {"Hold": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes: list[grpc.StatusCode] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            async def one() -> None:
                try:
                    async for _ in channel.unary_stream("/t.Hold/Hold")(b"", timeout=30):
                        pass
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())

            calls = asyncio.gather(*(one() for _ in range(1500)))
            await poll(lambda: entered + len(codes) == 1500, timeout_s=20)  # each held, or already cut
            release.set()
            await asyncio.wait_for(calls, 30)
    finally:
        await server.stop(0)
    cancelled = codes.count(grpc.StatusCode.CANCELLED)
    assert (cancelled == 0) if sized else (cancelled > 0), cancelled
