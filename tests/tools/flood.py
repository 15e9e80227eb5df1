"""A connection flood: N clients, each on a connection of its own, send one request and keep the connection open.

``python -m tests.tools.flood ADDRESS N`` prints one JSON line (how many were served, how each refusal ended) once
every connection has been tried, then holds the connections until its stdin closes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys

import grpc

from orchestrator.v1 import stages_pb2_grpc
from orchestrator_client import build_request


async def main(address: str, n: int) -> None:
    request = build_request("flood", session="flood", max_tokens=1)
    channels: list[grpc.aio.Channel] = []
    outcomes: collections.Counter[str] = collections.Counter()

    async def one() -> None:
        # A local subchannel pool: every channel its own connection, as N separate clients would have.
        channel = grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        channels.append(channel)
        try:
            async for _ in stages_pb2_grpc.StreamServiceStub(channel).Submit(request, timeout=30):
                pass
            outcomes["ok"] += 1
        except grpc.aio.AioRpcError as err:
            outcomes[err.code().name] += 1

    for start in range(0, n, 500):
        await asyncio.gather(*(one() for _ in range(min(500, n - start))))
    print(json.dumps(dict(outcomes)), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for channel in channels:
        await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
