"""``orchestrator worker-server``: any local worker served over the ModelWorkerService protocol."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from orchestrator.config import ConfigError, WorkerConfig, load_config
from orchestrator.errors import OrchestratorError, to_status
from orchestrator.pipeline.inference import WorkerStats, monitored
from orchestrator.runtime.server import ADMIN_SERVICE, configure_logging, write_ready_file
from orchestrator.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from orchestrator.workers.base import GenerationRequest, ModelWorker, build_worker

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["ModelWorkerService"].full_name
# Tokens per reply message: the same coalescing idea as the inference stage, without the timer.
BATCH = 8


class WorkerServicer(worker_pb2_grpc.ModelWorkerServiceServicer):
    def __init__(self, worker: ModelWorker, stats: WorkerStats) -> None:
        self._worker, self._stats = worker, stats

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        generation = GenerationRequest(
            request_id=request.request_id,
            prompt=request.prompt,
            max_tokens=request.params.max_tokens or 256,
            stop=tuple(request.params.stop),
            temperature=request.params.temperature,
        )
        batch: list[str] = []
        try:
            async for token in monitored(self._worker.generate(generation), self._stats):
                batch.append(token)
                if len(batch) >= BATCH:
                    yield worker_pb2.GenerateResponse(tokens=batch)
                    batch = []
            yield worker_pb2.GenerateResponse(tokens=batch)
        except OrchestratorError as err:
            status = to_status(err)
            await context.abort(status.code, status.details, status.trailing_metadata)


class WorkerAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, name: str, stats: WorkerStats) -> None:
        self._name, self._stats = name, stats

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        out = admin_pb2.GetStatusResponse(stage="worker")
        out.worker.name = self._name
        out.worker.active = self._stats.active
        out.worker.tokens_generated = self._stats.tokens_generated
        out.worker.last_generation_end_unix_nanos = self._stats.last_generation_end_unix_nanos
        return out


async def serve(cfg: WorkerConfig, host: str, port: int, ready_file: str | None) -> None:
    worker = build_worker(cfg)
    stats = WorkerStats()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_ModelWorkerServiceServicer_to_server(WorkerServicer(worker, stats), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(WorkerAdmin(worker.name, stats), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (WORKER_SERVICE, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", WORKER_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{bound}"
    log.info("worker server (%s) listening on %s", worker.name, address)
    if ready_file:
        write_ready_file(ready_file, "worker", address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(5)
    await worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="orchestrator worker-server",
        description="Serve the configured [inference.worker] over ModelWorkerService, for a kind=remote stage.",
    )
    parser.add_argument("--config", help="pipeline TOML (default: $ORCH_CONFIG, else built-in defaults)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50060, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--ready-file", help="write {stage, address, pid} as JSON here once serving")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"worker-server: {exc}", file=sys.stderr)
        return 2
    if cfg.inference.worker.kind == "remote":
        print("worker-server: inference.worker.kind must name a local worker, not remote", file=sys.stderr)
        return 2
    configure_logging(cfg.server.log_level, "worker")
    asyncio.run(serve(cfg.inference.worker, args.host, args.port, args.ready_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
