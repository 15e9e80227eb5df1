"""Floors built from bare grpc.aio hops, with none of the mesh's logic.

On its own, a process here is the single-hop floor: one server-streaming hop that yields N tokens,
one per message. Given ``--next``, it is one link of the bare chain floor: it relays the request's
bytes to the next process and the answers' bytes back, parsing nothing. Five processes chained this
way are what the mesh's five stages would cost if the stages did nothing but call each other, one
gRPC call per request per hop. With ``--links`` as well, the processes call each other over stage
links as the mesh does (the link chain floor): the mesh minus everything its stages do.

With ``--shed`` instead, it refuses every request at once with RESOURCE_EXHAUSTED, before any message, as a shed
does: the shed floor, what an answer costs the load generator and one hop at a given rate.

All serve the same ``StreamService/Submit`` as the mesh's edge, so the same client measures all.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from orchestrator.core.graph import EDGE, stage
from orchestrator.runtime.link import LinkClient, link_service
from orchestrator.runtime.server import run_loop, wait_for_stop_signal, write_ready_file
from orchestrator.v1 import stages_pb2_grpc, types_pb2

TOKEN = " tok"
SERVICE = stage(EDGE).full_service
SUBMIT = f"/{SERVICE}/Submit"


async def tokens(
    request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
) -> AsyncIterator[types_pb2.StreamChunk]:
    """The tokens of a request, one per message: the single hop, and the last process of a chain."""
    n = max(1, request.params.max_tokens)
    for i in range(n - 1):
        yield types_pb2.StreamChunk(sequence=i, text=TOKEN)
    last = types_pb2.StreamChunk(sequence=n - 1, text=TOKEN)
    last.completion.usage.completion_tokens = n
    last.completion.finish_reason = types_pb2.FINISH_REASON_LENGTH
    yield last


async def shed(request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Refuse at once, trailers-only, as the mesh's sheds are sent."""
    context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    context.set_details("shed floor")
    return
    yield  # an async generator, like the stage handlers


def relay_to(next_call: Callable[..., Any]) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """A ``Submit`` handler that passes each request to ``next_call`` and its answers back."""

    async def relay(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = next_call(request, timeout=context.time_remaining())
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message
        finally:
            call.cancel()

    return relay


def submit_service(handler: Callable[..., AsyncIterator[Any]], typed: bool) -> grpc.GenericRpcHandler:
    """``StreamService/Submit`` served by ``handler``: on messages, or on bytes that pass through unparsed."""
    codec: dict[str, Any] = (
        {"request_deserializer": types_pb2.PromptRequest.FromString, "response_serializer": _serialize} if typed else {}
    )
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Submit": grpc.unary_stream_rpc_method_handler(handler, **codec)}
    )


def _serialize(message: types_pb2.StreamChunk) -> bytes:
    return message.SerializeToString()


async def _serve(ready_file: str, next_address: str | None, links: bool, refuse: bool) -> None:
    server = grpc.aio.server()
    channel = None
    if next_address:
        channel = grpc.aio.insecure_channel(next_address)
    if refuse:
        handler: Callable[..., AsyncIterator[Any]] = shed
    elif channel is None:
        handler = tokens
    elif links:
        plain = stages_pb2_grpc.StreamServiceStub(channel).Submit
        handler = relay_to(LinkClient(channel, "next", types_pb2.StreamChunk.FromString, fallback=plain))
    else:
        handler = relay_to(channel.unary_stream(SUBMIT))  # no (de)serializers: bytes pass through
    # A relay of the bare chain parses nothing; the rest (the tail, the link chain) speaks messages.
    server.add_generic_rpc_handlers((submit_service(handler, typed=links or channel is None or refuse),))
    if links:
        # Every process of the link chain but the first is called over LinkService.
        link_service(handler).add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready_file(ready_file, "hop", f"127.0.0.1:{port}")
    await wait_for_stop_signal()
    await server.stop(1)
    if channel is not None:
        await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--next", help="relay to this address (a link of the bare chain)")
    parser.add_argument("--links", action="store_true", help="call --next over a stage link (the link chain)")
    parser.add_argument("--shed", action="store_true", help="refuse every request at once (the shed floor)")
    parser.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="run as the stages do (default uvloop)"
    )
    args = parser.parse_args()
    run_loop(_serve(args.ready_file, args.next, args.links, args.shed), args.event_loop == "uvloop")


if __name__ == "__main__":
    main()
