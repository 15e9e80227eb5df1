"""RemoteWorker: a model in another process, over this project's ModelWorkerService protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from orchestrator.core.calls import Options
from orchestrator.core.errors import OrchestratorError, from_rpc_error
from orchestrator.v1 import types_pb2, worker_pb2, worker_pb2_grpc
from orchestrator.workers.base import GenerationRequest, ModelWorker


def _as_backend_error(err: grpc.aio.AioRpcError) -> OrchestratorError:
    """The worker server's failure, as this stage's own (the server is its backend, not a stage)."""
    mapped = from_rpc_error(err, "", what="model worker server")
    mapped.stage = ""  # the stage running this worker puts its own name on it
    return mapped


class RemoteWorker(ModelWorker):
    """Streams tokens from a ``ModelWorkerService``; closing the generation cancels the call."""

    def __init__(self, address: str, name: str = "", options: Options = ()) -> None:
        self.address = address
        self.name = name or f"remote:{address}"
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._stub = worker_pb2_grpc.ModelWorkerServiceStub(self._channel)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        call = self._stub.Generate(
            worker_pb2.GenerateRequest(
                request_id=request.request_id,
                prompt=request.prompt,
                params=types_pb2.GenerationParams(
                    max_tokens=request.max_tokens, stop=list(request.stop), temperature=request.temperature
                ),
            )
        )
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    return
                for token in reply.tokens:
                    yield token
        except grpc.aio.AioRpcError as err:
            raise _as_backend_error(err) from None  # not kept in a local: its traceback holds this frame
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
