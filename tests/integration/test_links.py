"""Stage links over real gRPC on port 0: many calls on one stream behave like separate calls."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from orchestrator.core.config import load_config
from orchestrator.core.errors import Overloaded, from_rpc_error, to_status
from orchestrator.runtime import link
from orchestrator.runtime.link import LinkClient, link_service
from orchestrator.runtime.server import RunningStage
from orchestrator.stages.local import LocalPipeline
from orchestrator.v1 import stages_pb2_grpc, types_pb2
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError, build_request
from tests.integration.conftest import poll, start_all


class Callee:
    """A stage handler whose behaviour each request chooses through ``meta``."""

    def __init__(self) -> None:
        self.produced: dict[str, int] = {}
        self.cancelled: set[str] = set()
        self.contexts: dict[str, Any] = {}
        self.starts: dict[str, int] = {}
        self.gate = asyncio.Event()

    async def handle(self, request: types_pb2.PromptRequest, context: Any) -> AsyncIterator[types_pb2.PostOutput]:
        rid = request.request_id
        self.contexts[rid] = context
        self.produced[rid] = 0
        self.starts[rid] = self.starts.get(rid, 0) + 1
        mode = request.meta.get("mode", "")
        try:
            if mode == "shed":
                status = to_status(Overloaded("post queue full", stage="post", retry_after_s=0.25))
                context.set_code(status.code)
                context.set_details(status.details)
                context.set_trailing_metadata(status.trailing_metadata)
                return
            if mode == "hang":
                await asyncio.Event().wait()
            if mode == "gate":
                await self.gate.wait()
            for i in range(request.params.max_tokens):
                if mode == "one-then-gate" and i == 1:
                    await self.gate.wait()
                self.produced[rid] += 1
                yield types_pb2.PostOutput(text=f"{rid}-{i}", tokens=1)
        except asyncio.CancelledError:
            self.cancelled.add(rid)
            raise


async def serve_links(
    handler: Callee, address: str = "127.0.0.1:0", options: list[tuple[str, Any]] | None = None
) -> tuple[grpc.aio.Server, str]:
    """A server with only LinkService, running ``handler`` for each call; returns it and its address."""
    server = grpc.aio.server(options=options)
    link_service(handler.handle).add(server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, f"127.0.0.1:{port}"


Linked = tuple[Callee, LinkClient[types_pb2.PostOutput]]


@pytest.fixture
async def linked() -> AsyncIterator[Linked]:
    """A LinkService-only callee and a link client to it."""
    handler = Callee()
    server, address = await serve_links(handler)
    async with grpc.aio.insecure_channel(address) as channel:
        client = link_client(channel)
        yield handler, client
        await client.close()
    await server.stop(0)


def link_client(channel: grpc.aio.Channel) -> LinkClient[types_pb2.PostOutput]:
    """A link to the post stage, with its plain RPC as the fallback."""
    return LinkClient(
        channel, "post", types_pb2.PostOutput.FromString, fallback=stages_pb2_grpc.PostServiceStub(channel).Process
    )


def request(rid: str, n: int, mode: str = "") -> types_pb2.PromptRequest:
    req = build_request("hello", session="s", max_tokens=n)
    req.request_id = rid
    if mode:
        req.meta["mode"] = mode
    return req


async def read_all(call: Any) -> list[str]:
    out = []
    while (message := await call.read()) is not grpc.aio.EOF:
        out.append(message.text)
    return out


async def test_concurrent_calls_share_one_stream_and_keep_their_order(
    linked: Linked,
) -> None:
    _, client = linked
    calls = {f"r{i}": client(request(f"r{i}", 50 + i)) for i in range(40)}
    results = await asyncio.gather(*(read_all(c) for c in calls.values()))
    for (rid, _), texts in zip(calls.items(), results, strict=True):
        assert texts == [f"{rid}-{k}" for k in range(50 + int(rid[1:]))]


async def test_a_slow_reader_holds_back_only_its_own_call(linked: Linked) -> None:
    handler, client = linked
    slow = client(request("slow", 10_000))
    await slow.read()
    # The callee stops at the window: it never runs ahead of the reader by more than that.
    await poll(lambda: handler.produced.get("slow", 0) >= link.WINDOW)
    await asyncio.sleep(0.1)
    assert handler.produced["slow"] <= link.WINDOW + 1
    # Another call on the same link is not stuck behind it.
    assert len(await asyncio.wait_for(read_all(client(request("fast", 500))), 5)) == 500
    # Reading on lets the slow call go on, and it completes.
    rest = await asyncio.wait_for(read_all(slow), 10)
    assert len(rest) == 9_999


async def test_cancel_stops_the_callee_at_once(linked: Linked) -> None:
    handler, client = linked
    call = client(request("c1", 1, mode="hang"))
    await poll(lambda: "c1" in handler.produced)
    assert call.cancel()
    await poll(lambda: "c1" in handler.cancelled, timeout_s=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert not call.cancel()  # already ended


async def test_deadline_travels_with_the_call(linked: Linked) -> None:
    handler, client = linked
    call = client(request("d1", 1, mode="hang"), timeout=0.2)
    await poll(lambda: "d1" in handler.contexts)
    remaining = handler.contexts["d1"].time_remaining()
    assert 0 < remaining <= 0.2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(read_all(call), 5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "d1" in handler.cancelled


async def test_a_status_with_details_arrives_as_the_callee_sent_it(
    linked: Linked,
) -> None:
    _, client = linked
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await read_all(client(request("s1", 3, mode="shed")))
    err = from_rpc_error(info.value, "post")
    assert isinstance(err, Overloaded)
    assert (err.stage, err.message, err.retry_after_s) == ("post", "post queue full", 0.25)


async def test_a_lost_link_fails_its_calls_and_the_next_call_opens_a_new_one() -> None:
    handler = Callee()
    server, address = await serve_links(handler)
    async with grpc.aio.insecure_channel(address) as channel:
        client = link_client(channel)
        call = client(request("l1", 1, mode="hang"))
        await poll(lambda: "l1" in handler.produced)
        await server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), 5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "post" in (info.value.details() or "")

        server, again = await serve_links(handler, address)  # the same port
        assert again == address
        try:

            async def eventually_served() -> list[str]:
                while True:
                    try:
                        return await read_all(client(request("l2", 2)))
                    except grpc.aio.AioRpcError as err:
                        assert err.code() == grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.05)

            assert await asyncio.wait_for(eventually_served(), 10) == ["l2-0", "l2-1"]
        finally:
            await client.close()
            await server.stop(0)


async def test_a_lost_link_makes_again_only_the_calls_that_received_nothing() -> None:
    """The callee's connection ages out (max_connection_age: GOAWAY, then its streams are cut) with two calls on
    the link: the one that had received nothing is made again on a new link and completes; the one that had
    started streaming ends UNAVAILABLE (repeating it would repeat what its caller already has)."""
    handler = Callee()
    age = [("grpc.max_connection_age_ms", 400), ("grpc.max_connection_age_grace_ms", 100)]
    server, address = await serve_links(handler, options=age)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            client = link_client(channel)
            waiting = client(request("w1", 3, mode="gate"))
            started = client(request("s1", 3, mode="one-then-gate"))
            assert (await started.read()).text == "s1-0"
            await poll(lambda: handler.starts.get("w1") == 2, timeout_s=5)  # made again, on a new link
            assert handler.starts["s1"] == 1
            handler.gate.set()
            assert await asyncio.wait_for(read_all(waiting), 5) == ["w1-0", "w1-1", "w1-2"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(read_all(started), 5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "post" in (info.value.details() or "")
            await client.close()
    finally:
        await server.stop(0)


async def test_a_callee_without_links_is_called_directly() -> None:
    """A stage of a version without LinkService (mid-upgrade): its RPC is called instead, nothing is lost."""
    handler = Callee()
    servicer = stages_pb2_grpc.PostServiceServicer()
    servicer.Process = handler.handle  # type: ignore[method-assign]
    server = grpc.aio.server()
    stages_pb2_grpc.add_PostServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            client = link_client(channel)
            # Calls already under way when the link is refused are made again directly.
            first = await asyncio.gather(*(read_all(client(request(f"f{i}", 3), timeout=5)) for i in range(3)))
            assert first == [[f"f{i}-{k}" for k in range(3)] for i in range(3)]
            assert await read_all(client(request("later", 2))) == ["later-0", "later-1"]
            assert client.direct
            # The deadline goes with the direct call too.
            hanging = client(request("d", 1, mode="hang"), timeout=5)
            await poll(lambda: "d" in handler.contexts)
            assert 4 < handler.contexts["d"].time_remaining() < 5.1
            assert hanging.cancel()
            await client.close()
    finally:
        await server.stop(0)


@pytest.mark.parametrize("links", ["true", "false"])
async def test_both_transports_give_the_same_answers(links: str) -> None:
    running = await start_all({"ORCH_SERVER_STAGE_LINKS": links})
    try:
        local = LocalPipeline(load_config(env={}))
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            for session, text in [("a", "What is session affinity?"), ("b", "How do stop sequences work?")]:
                req = build_request(text, session=session, max_tokens=30, stop=["Question"])
                remote = await client.complete(text, session=session, max_tokens=30, stop=["Question"])
                expected = [c async for c in local.submit(req)]
                assert remote.text == "".join(c.text for c in expected)
        # Each stage counted the requests it served, whichever way they came.
        assert all(stage.app.runtime.outcomes.ok == 2 for stage in running.values())
    finally:
        for stage in reversed(running.values()):
            await stage.stop(0)


async def test_random_cancels_and_deadlines_leave_nothing_behind() -> None:
    """Many concurrent streams over the links, some read to the end, some cancelled part way, some out of time:
    the finished ones are exact, the others end with the right status, and afterwards no stage, worker or link
    holds anything."""
    rng = random.Random(5)
    # One token per message and a delay per token: long streams, many frames, credit windows in use.
    env = {
        "ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "1",
        "ORCH_INFERENCE_COALESCE_TOKENS": "1",
        "ORCH_INFERENCE_COALESCE_MS": "0",
    }
    running = await start_all(env)
    local = LocalPipeline(load_config(env=env))
    questions = ["What is session affinity?", "How do stop sequences work?", "Why pull and not push?"]
    expected: dict[tuple[str, int], str] = {}
    for q in questions:
        for n in (5, 90):
            chunks = [c async for c in local.submit(build_request(q, session="x", max_tokens=n))]
            expected[(q, n)] = "".join(c.text for c in chunks)
    outcomes: dict[str, int] = {"ok": 0, "cancelled": 0, "deadline": 0}
    gate = asyncio.Semaphore(32)

    async def one(client: AsyncOrchestratorClient, i: int) -> None:
        q, n = rng.choice(questions), rng.choice((5, 90))
        kind = rng.choice(("ok", "cancel", "deadline"))
        timeout = rng.uniform(0.01, 0.08) if kind == "deadline" else 30.0
        async with gate:
            text = []
            try:
                stream = client.submit(q, session=f"s{i}", max_tokens=n, timeout=timeout)
                async for chunk in stream:
                    text.append(chunk.text)
                    if kind == "cancel" and len(text) == 3:
                        await stream.aclose()
                        outcomes["cancelled"] += 1
                        return
            except OrchestratorRpcError as err:
                assert kind == "deadline", (kind, err)
                assert err.code == grpc.StatusCode.DEADLINE_EXCEEDED
                outcomes["deadline"] += 1
                return
            assert "".join(text) == expected[(q, n)]
            outcomes["ok"] += 1

    try:
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            await asyncio.gather(*(one(client, i) for i in range(150)))
        assert outcomes["ok"] > 40 and outcomes["cancelled"] > 20 and outcomes["deadline"] > 20, outcomes

        await poll(
            lambda: (
                all(s.app.runtime.in_flight == 0 for s in running.values())
                and worker_active(running) == 0
                and links_in_use(running) == 0
            )
        )
    finally:
        for stage in reversed(running.values()):
            await stage.stop(0)


def links_in_use(running: dict[str, RunningStage]) -> int:
    """Calls in flight on every stage's links to its callee."""
    total = 0
    for stage in running.values():
        if stage.app.downstream is not None:
            total += sum(t.in_flight for t in stage.app.downstream.transports.values() if isinstance(t, LinkClient))
    return total


def worker_active(running: dict[str, RunningStage]) -> int:
    status = running["inference"].app.worker_status
    assert status is not None
    return status().active


async def test_calls_in_flight_on_links_are_seen() -> None:
    """The accounting the randomised test relies on sees a call held on every link, and its end."""
    running = await start_all({"ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS": "20"})
    try:
        assert links_in_use(running) == 0
        async with AsyncOrchestratorClient(running["stream"].address) as client:
            stream = client.submit("hold the links", session="h", max_tokens=500)
            await anext(stream)
            # Streaming: the calls on the stream->post and post->inference links (rag and assemble are done).
            assert links_in_use(running) == 2
            await stream.aclose()
        await poll(lambda: links_in_use(running) == 0 and worker_active(running) == 0)
    finally:
        for stage in reversed(running.values()):
            await stage.stop(0)
