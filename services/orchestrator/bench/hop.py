"""Floors built from bare grpc.aio hops, with none of the mesh's logic.

On its own, a process here is the single-hop floor: one server-streaming hop that yields N tokens,
one per message. Given ``--next``, it is one link of the bare chain floor: it relays the request's
bytes to the next process and the answers' bytes back, parsing nothing. Five processes chained this
way are what the mesh's five stages would cost if the stages did nothing but call each other, one
gRPC call per request per hop. With ``--links`` as well, the processes call each other over stage
links as the mesh does (the link chain floor): the mesh minus everything its stages do.

Both serve the same ``StreamService/Submit`` as the mesh's edge, so the same client measures all.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import grpc

from orchestrator.runtime.link import LinkClient, LinkServicer
from orchestrator.runtime.server import run_loop, wait_for_stop_signal, write_ready_file
from orchestrator.v1 import link_pb2_grpc, stages_pb2_grpc, types_pb2

TOKEN = " tok"
SUBMIT = "/orchestrator.v1.StreamService/Submit"


class HopServicer(stages_pb2_grpc.StreamServiceServicer):
    async def Submit(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.StreamChunk]:
        n = max(1, request.params.max_tokens)
        for i in range(n - 1):
            yield types_pb2.StreamChunk(sequence=i, text=TOKEN)
        last = types_pb2.StreamChunk(sequence=n - 1, text=TOKEN)
        last.completion.usage.completion_tokens = n
        last.completion.finish_reason = types_pb2.FINISH_REASON_LENGTH
        yield last


class RelayHandler(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Relays ``Submit`` as bytes to the next link: the cost of a hop and nothing else."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._next = channel.unary_stream(SUBMIT)  # no (de)serializers: bytes pass through

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method == SUBMIT:
            return grpc.unary_stream_rpc_method_handler(self._relay)
        return None

    async def _relay(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        call = self._next(request, timeout=context.time_remaining())
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message
        finally:
            call.cancel()


class LinkRelay(stages_pb2_grpc.StreamServiceServicer):
    """Yields the tokens itself (the last process) or relays them from the next process over a stage link."""

    def __init__(self, channel: grpc.aio.Channel | None) -> None:
        self._next = None
        if channel is not None:
            plain = stages_pb2_grpc.StreamServiceStub(channel).Submit
            self._next = LinkClient(channel, "next", types_pb2.StreamChunk.FromString, fallback=plain)

    async def Submit(
        self, request: types_pb2.PromptRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[types_pb2.StreamChunk]:
        if self._next is None:
            async for chunk in HopServicer().Submit(request, context):
                yield chunk
            return
        call = self._next(request, timeout=context.time_remaining())
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message
        finally:
            call.cancel()


async def _serve(ready_file: str, next_address: str | None, links: bool) -> None:
    server = grpc.aio.server()
    channel = None
    if next_address:
        channel = grpc.aio.insecure_channel(next_address)
    if links:
        relay = LinkRelay(channel)
        stages_pb2_grpc.add_StreamServiceServicer_to_server(relay, server)
        link_pb2_grpc.add_LinkServiceServicer_to_server(LinkServicer(relay.Submit), server)
    elif channel is not None:
        server.add_generic_rpc_handlers((RelayHandler(channel),))
    else:
        stages_pb2_grpc.add_StreamServiceServicer_to_server(HopServicer(), server)
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
    parser.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), default="uvloop", help="run as the stages do (default uvloop)"
    )
    args = parser.parse_args()
    run_loop(_serve(args.ready_file, args.next, args.links), args.event_loop == "uvloop")


if __name__ == "__main__":
    main()
