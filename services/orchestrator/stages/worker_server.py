"""``orchestrator worker-server``: any local worker served over the ModelWorkerService protocol."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2

from orchestrator.core.calls import channel_options, server_options
from orchestrator.core.config import MeshConfig
from orchestrator.core.errors import OrchestratorError, to_status
from orchestrator.runtime.server import (
    add_health_and_reflection,
    bind,
    configure_logging,
    load_config_or_report,
    new_server,
    run_loop,
    settle_gc,
    wait_for_stop_signal,
    write_ready_file,
)
from orchestrator.v1 import admin_pb2, admin_pb2_grpc, worker_pb2, worker_pb2_grpc
from orchestrator.workers.base import GenerationRequest, ModelWorker
from orchestrator.workers.registry import build_worker
from orchestrator.workers.stats import WorkerStats, monitored

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
            to_status(err).set_on(context)


class WorkerAdmin(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, name: str, stats: WorkerStats) -> None:
        self._name, self._stats = name, stats

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        return admin_pb2.GetStatusResponse(stage="worker", worker=self._stats.status(self._name))


async def serve(cfg: MeshConfig, host: str, port: int, ready_file: str | None) -> None:
    worker = build_worker(cfg.inference.worker, channel_options=channel_options(cfg.server, cfg.network))
    stats = WorkerStats()
    server = new_server(server_options(cfg.server, cfg.network))
    worker_pb2_grpc.add_ModelWorkerServiceServicer_to_server(WorkerServicer(worker, stats), server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(WorkerAdmin(worker.name, stats), server)
    health_servicer = add_health_and_reflection(server, (WORKER_SERVICE,))
    address = bind(server, host, port, "worker server")
    await server.start()
    for name in ("", WORKER_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    settle_gc(cfg.server.gc_full_every)
    log.info("worker server (%s) listening on %s", worker.name, address)
    if ready_file:
        write_ready_file(ready_file, "worker", address)
    await wait_for_stop_signal()
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
    cfg = load_config_or_report(args.config, "worker-server")
    if cfg is None:
        return 2
    if cfg.inference.worker.kind == "remote":
        print("worker-server: inference.worker.kind must name a local worker, not remote", file=sys.stderr)
        return 2
    configure_logging(cfg.server.log_level, "worker")
    try:
        run_loop(
            serve(cfg, args.host, args.port, args.ready_file),
            cfg.server.uvloop,
        )
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
