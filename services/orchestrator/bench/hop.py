"""The single-hop floor: one bare grpc.aio server-streaming hop that yields N tokens, one per message.

It serves the same ``StreamService/Submit`` as the mesh's edge, so the same client measures both.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import grpc

from orchestrator.runtime.server import wait_for_stop_signal, write_ready_file
from orchestrator.v1 import stages_pb2_grpc, types_pb2

TOKEN = " tok"


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


async def _serve(ready_file: str) -> None:
    server = grpc.aio.server()
    stages_pb2_grpc.add_StreamServiceServicer_to_server(HopServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready_file(ready_file, "hop", f"127.0.0.1:{port}")
    await wait_for_stop_signal()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", required=True)
    asyncio.run(_serve(parser.parse_args().ready_file))


if __name__ == "__main__":
    main()
