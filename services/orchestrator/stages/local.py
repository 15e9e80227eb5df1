"""The five stages in this process, calling each other in memory: the colocated layout without its gRPC servers.

The same code as a colocated process runs (each stage built by its own module, its runtime, admission, spans and
errors; calls between stages through ``LocalTransport``), entered at the edge's handler. Used by tests as the
reference output and by the benchmark as its in-process floor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from orchestrator.core.config import MeshConfig
from orchestrator.core.errors import from_rpc_error
from orchestrator.core.graph import EDGE, STAGES
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.colocated import colocating
from orchestrator.runtime.server import StageApp
from orchestrator.runtime.transport import LocalCall
from orchestrator.stages import module
from orchestrator.v1 import types_pb2


class LocalPipeline:
    """RAG -> Assemble -> Inference -> Post -> Stream in this process, pulled from the Stream end."""

    def __init__(self, cfg: MeshConfig) -> None:
        self.cfg = cfg
        self.apps: dict[str, StageApp] = {}
        with colocating() as local:
            for name in STAGES:  # callee first: each caller is built calling the stage before it in memory
                app = module(name).build(cfg, Telemetry())
                assert app.handler is not None
                local[name] = app.handler
                self.apps[name] = app
        self._edge = local[EDGE]

    async def submit(self, request: types_pb2.PromptRequest) -> AsyncIterator[types_pb2.StreamChunk]:
        """The chunks of one request, as a client of the edge would get them; a failure raises the error the mesh
        would send (``OrchestratorError``)."""
        call = LocalCall(self._edge, request, None, (), "client")
        try:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                yield chunk
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, EDGE) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        for app in self.apps.values():
            await app.close()
