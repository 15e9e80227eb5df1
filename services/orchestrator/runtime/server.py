"""Stage server bootstrap: health, reflection, admin status, ready file, graceful drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from orchestrator.config import ConfigError, MeshConfig, load_config
from orchestrator.pipeline.inference import WorkerStats
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.telemetry import Telemetry, build_telemetry
from orchestrator.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass
class StageApp:
    """A stage, built from config and ready to be served."""

    name: str
    runtime: StageRuntime
    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    worker_stats: WorkerStats | None = None
    worker_name: str = ""

    async def close(self) -> None:
        for closer in self.closers:
            await closer()


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: StageApp) -> None:
        self._app = app

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        out = self._app.runtime.status()
        stats = self._app.worker_stats
        if stats is not None:
            out.worker.name = self._app.worker_name
            out.worker.active = stats.active
            out.worker.tokens_generated = stats.tokens_generated
            out.worker.last_generation_end_unix_nanos = stats.last_generation_end_unix_nanos
        return out


@dataclass
class RunningStage:
    app: StageApp
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str
    metrics_address: str = ""
    _metrics_server: Any = None

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.app.service_names, ADMIN_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Drain: report NOT_SERVING and refuse new requests with UNAVAILABLE (health checks still
        answer, so probes and balancers see it), let in-flight streams finish within ``grace_s``,
        then stop the server, cancelling whatever is left."""
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        drained = await self.app.runtime.drain(grace_s)
        if not drained:
            log.warning(
                "stage=%s grace period over with %d requests in flight", self.app.name, self.app.runtime.in_flight
            )
        await self.server.stop(max(0.0, deadline - loop.time()))
        await self.app.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        # Exporters flush with blocking I/O: off the loop.
        await asyncio.to_thread(self.app.runtime.telemetry.shutdown)

    def start_metrics(self, host: str, port: int) -> None:
        """Serve Prometheus /metrics for this stage's registry (a daemon thread)."""
        server, _ = start_http_server(port, addr=host, registry=self.app.runtime.telemetry.metrics.registry)
        self._metrics_server = server
        self.metrics_address = f"{host}:{server.server_port}"


async def start_stage(app: StageApp, host: str, port: int) -> RunningStage:
    """Start serving ``app`` on ``host:port`` (port 0 picks a free port; the real one is returned)."""
    # so_reuseport off: a second mesh on the same ports must fail loudly, not share them.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    app.register(server)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(app), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*app.service_names, ADMIN_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise OSError(f"{app.name} stage cannot listen on {host}:{port}: {exc}") from None
    if bound == 0:
        raise OSError(f"{app.name} stage cannot listen on {host}:{port} (port in use?)")
    await server.start()
    running = RunningStage(app, server, health_servicer, f"{host}:{bound}")
    await running.set_serving(True)
    return running


def _write_ready_file(path: str, running: RunningStage) -> None:
    """Tell a launcher where we listen: written atomically, so a reader never sees half of it."""
    tmp = Path(f"{path}.tmp")
    info = {
        "stage": running.app.name,
        "address": running.address,
        "metrics_address": running.metrics_address,
        "pid": os.getpid(),
    }
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def serve(
    name: str, build: Callable[[MeshConfig, Telemetry], StageApp], cfg: MeshConfig, ready_file: str | None = None
) -> None:
    """Build the stage on the running loop (gRPC channels bind to it), serve until SIGTERM or SIGINT, drain."""
    stage_cfg = cfg.stage(name)
    app = build(cfg, build_telemetry(name, record_text=cfg.server.trace_text))
    running = await start_stage(app, stage_cfg.host, stage_cfg.port)
    if stage_cfg.metrics_port >= 0:
        running.start_metrics(stage_cfg.host, stage_cfg.metrics_port)
    log.info("stage=%s listening on %s (metrics %s)", app.name, running.address, running.metrics_address or "off")
    if ready_file:
        _write_ready_file(ready_file, running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stage=%s draining (grace %.1fs)", app.name, cfg.server.drain_grace_s)
    await running.stop(cfg.server.drain_grace_s)
    log.info("stage=%s stopped", app.name)


def configure_logging(level: str, stage: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {stage} %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_stage_main(
    name: str, build: Callable[[MeshConfig, Telemetry], StageApp], argv: Sequence[str] | None = None
) -> int:
    """Entry point of a stage process: load config once, build the stage, serve."""
    parser = argparse.ArgumentParser(
        prog=f"orchestrator stage {name}",
        description=f"Run the {name} stage. Settings come from --config (or $ORCH_CONFIG) and ORCH_* variables.",
    )
    parser.add_argument("--config", help="pipeline TOML file (default: $ORCH_CONFIG, else built-in defaults)")
    parser.add_argument("--ready-file", help="write {stage, address, pid} as JSON here once serving")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(cfg.server.log_level, name)
    try:
        asyncio.run(serve(name, build, cfg, args.ready_file))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0
