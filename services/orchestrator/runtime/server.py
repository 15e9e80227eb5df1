"""Stage server bootstrap: health, reflection, admin status, ready file, graceful drain on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from orchestrator.core.calls import Handler
from orchestrator.core.config import ConfigError, MeshConfig, is_loopback, load_config
from orchestrator.core.errors import OrchestratorError, PermissionDenied, StartupError, WireStatus, to_status
from orchestrator.core.graph import STAGES
from orchestrator.core.telemetry import Telemetry, build_telemetry
from orchestrator.runtime.colocated import colocating
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.reflection import add_reflection
from orchestrator.runtime.security import CertificateFiles, certificate_names
from orchestrator.runtime.stage import StageRuntime
from orchestrator.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
# A health name for liveness probes: SERVING for as long as the process runs, whatever readiness says
# (an open circuit breaker must take a pod out of rotation, not restart it).
LIVENESS = "orchestrator.liveness"


@dataclass(frozen=True)
class Service:
    """A gRPC service a process serves: its full name and how to add it to a server."""

    name: str
    add: Callable[[grpc.aio.Server], None]
    # Listed in reflection and health; an internal service (the stage links) is not.
    public: bool = True


@dataclass
class StageApp:
    """A stage, built from config and ready to be served."""

    name: str
    runtime: StageRuntime
    services: Sequence[Service]
    # gRPC server options (message size limits).
    options: Sequence[tuple[str, Any]] = ()
    # What the stage serves over TLS (None: plaintext).
    certificates: CertificateFiles | None = None
    # Serve gRPC reflection.
    reflection: bool = True
    # The stage's RPC method, as the runtime wraps it: what a colocated caller calls in memory.
    handler: Handler | None = None
    # The calls this stage makes to the next one (None for the first stage of the chain).
    downstream: Downstream[Any] | None = None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # What GetStatus reports of the stage's model worker, if it has one.
    worker_status: Callable[[], admin_pb2.WorkerStatus] | None = None
    # What GetStatus names as serving the stage's requests (the RAG stage's retriever), if anything.
    serving: Callable[[], str] | None = None
    # Re-apply a freshly loaded config (the inference stage swaps its worker, the RAG stage reopens its index);
    # None: nothing to reload.
    reload: Callable[[MeshConfig], Awaitable[str]] | None = None
    readiness_listener: Callable[[bool], None] | None = None

    @property
    def service_names(self) -> list[str]:
        """The services health and reflection report."""
        return [s.name for s in self.services if s.public]

    def set_ready(self, ready: bool) -> None:
        """Report SERVING or NOT_SERVING (e.g. while a worker's circuit breaker is open)."""
        if self.readiness_listener is not None:
            self.readiness_listener(ready)

    async def close(self) -> None:
        if self.downstream is not None:
            await self.downstream.close()
        for closer in self.closers:
            await closer()


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, app: StageApp, reload_config: Callable[[], MeshConfig] | None = None) -> None:
        self._app = app
        self.reload_config = reload_config

    def _authorize(self, context: grpc.aio.ServicerContext) -> bool:
        """Admin keys only when the process has keys. Without keys: callers on this machine, and callers whose
        certificate (checked by mutual TLS) names a stage of the mesh, as operator tools show the edge's. Sets the
        status and returns False for anyone else."""
        stage = self._app.name
        keys = self._app.runtime.keys
        try:
            if keys is not None:
                keys.authenticate(context.invocation_metadata() or (), stage, admin=True)
            elif not _local(context.peer()) and not (certificate_names(context.auth_context()) & set(STAGES)):
                raise PermissionDenied(
                    f"the {stage} stage's admin service answers this machine and the mesh's certificates only "
                    "(auth.keys_file adds admin keys)",
                    stage=stage,
                )
        except OrchestratorError as err:
            to_status(err).set_on(context)
            return False
        return True

    async def Reload(
        self, request: admin_pb2.ReloadRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReloadResponse:
        if not self._authorize(context):
            return admin_pb2.ReloadResponse()
        load = self.reload_config
        if self._app.reload is None or load is None:
            status = WireStatus(grpc.StatusCode.UNIMPLEMENTED, f"the {self._app.name} stage has nothing to reload")
            status.set_on(context)
            return admin_pb2.ReloadResponse()  # not sent: the status is an error
        try:
            return admin_pb2.ReloadResponse(worker=await reload_app(self._app, load))
        except (ConfigError, StartupError) as exc:
            WireStatus(grpc.StatusCode.FAILED_PRECONDITION, str(exc)).set_on(context)
            return admin_pb2.ReloadResponse()

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        if not self._authorize(context):
            return admin_pb2.GetStatusResponse()
        out = self._app.runtime.status()
        if self._app.worker_status is not None:
            out.worker.CopyFrom(self._app.worker_status())
        if self._app.serving is not None:
            out.serving = self._app.serving()
        if self._app.downstream is not None:
            replicas = self._app.downstream.replicas
            out.callees.extend(
                admin_pb2.CalleeReplica(stage=replicas.stage, address=a, ejected=a in replicas.ejected)
                for a in replicas.addresses
            )
        return out


def _local(peer: str) -> bool:
    """Whether a gRPC peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``) is this machine."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    return is_loopback(host.removeprefix("::ffff:"))


async def reload_app(app: StageApp, load: Callable[[], MeshConfig]) -> str:
    """Load the config again (file and environment) and hand it to the stage; returns what now serves (the
    inference stage's worker, the RAG stage's retriever)."""
    assert app.reload is not None
    cfg = load()
    worker = await app.reload(cfg)
    log.info("stage=%s reloaded; now %s", app.name, worker)
    return worker


@dataclass
class RunningStage:
    app: StageApp
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    address: str
    admin: AdminServicer
    metrics_address: str = ""
    # The plaintext health-only listener, if any (probes that cannot do TLS).
    health_server: grpc.aio.Server | None = None
    health_address: str = ""
    # AdminService's own listener, if it has one (``<stage>.admin_port``).
    admin_server: grpc.aio.Server | None = None
    admin_address: str = ""
    draining: bool = False
    _metrics_server: Any = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def set_serving_soon(self, serving: bool) -> None:
        """``set_serving`` from synchronous code on the loop (a circuit breaker changing state)."""
        self._spawn(self.set_serving(serving))

    def reload_in_background(self) -> None:
        """SIGHUP: read the TLS files again (the next connection gets them) and reload the worker, without
        blocking the signal handler; a bad config keeps the current worker."""
        if self.app.certificates is not None:
            self.app.certificates.reload()
        if self.app.runtime.keys is not None:
            self.app.runtime.keys.reload(force=True)
        load = self.admin.reload_config
        if self.app.reload is None or load is None:
            return

        async def run() -> None:
            try:
                await reload_app(self.app, load)
            except (ConfigError, StartupError) as exc:
                log.error("stage=%s reload refused, keeping what serves now: %s", self.app.name, exc)

        self._spawn(run())

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    async def set_serving(self, serving: bool) -> None:
        """Readiness (the server and its services); liveness is left alone. Once draining, never SERVING again."""
        if serving and self.draining:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.app.service_names, ADMIN_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Drain: report NOT_SERVING and refuse new requests with UNAVAILABLE (health checks still
        answer, so probes and balancers see it), let in-flight streams finish within ``grace_s``,
        then stop the server, cancelling whatever is left. Liveness stays SERVING until the process ends: a
        draining pod must be taken out of rotation, not restarted."""
        self.draining = True
        await self.set_serving(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        drained = await self.app.runtime.drain(grace_s)
        if not drained:
            log.warning(
                "stage=%s grace period over with %d requests in flight", self.app.name, self.app.runtime.in_flight
            )
        await self.server.stop(max(0.0, deadline - loop.time()))
        for extra in (self.health_server, self.admin_server):
            if extra is not None:
                await extra.stop(0)
        await self.app.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        # Exporters flush with blocking I/O: off the loop.
        await asyncio.to_thread(self.app.runtime.telemetry.shutdown)

    async def serve_admin(self, host: str, port: int) -> None:
        """AdminService on a listener of its own: plaintext on loopback, the stage's TLS anywhere else."""
        self.admin_server = new_server()
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.admin_server)
        certificates = self.app.certificates
        credentials = None if certificates is None or is_loopback(host) else certificates.twin().credentials()
        self.admin_address = bind(self.admin_server, host, port, f"{self.app.name} stage's admin service", credentials)
        await self.admin_server.start()

    def start_metrics(self, host: str, port: int) -> None:
        """Serve Prometheus /metrics for this stage's registry (a daemon thread)."""
        server, _ = start_http_server(port, addr=host, registry=self.app.runtime.telemetry.metrics.registry)
        self._metrics_server = server
        self.metrics_address = f"{host}:{server.server_port}"


def new_server(options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Server:
    # so_reuseport off: a second mesh on the same ports must fail loudly, not share them.
    return grpc.aio.server(options=[("grpc.so_reuseport", 0), *options])


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str], reflection: bool = True, admin: bool = True
) -> health.aio.HealthServicer:
    """The stock async health service, and reflection (v1 and v1alpha) over ``service_names``, health, and admin
    when it is served here."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection:
        add_reflection(server, (*service_names, *([ADMIN_SERVICE] if admin else []), health.SERVICE_NAME))
    return health_servicer


def advertised(address: str) -> str:
    """How a replica names itself: its address, or its host name with the port when it binds every interface."""
    host, _, port = address.rpartition(":")
    return f"{socket.gethostname()}:{port}" if host in ("0.0.0.0", "[::]", "::", "") else address


def bind(
    server: grpc.aio.Server, host: str, port: int, what: str, credentials: grpc.ServerCredentials | None = None
) -> str:
    """Listen on ``host:port`` (0: a free port), over TLS with ``credentials``, and return the real address, or
    raise OSError saying why not."""
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError as exc:
        raise OSError(f"{what} cannot listen on {host}:{port}: {exc}") from None
    if bound == 0:
        raise OSError(f"{what} cannot listen on {host}:{port} (port in use?)")
    return f"{host}:{bound}"


async def wait_for_stop_signal(on_hup: Callable[[], None] | None = None) -> None:
    """Return on SIGTERM or SIGINT; ``on_hup`` (if given) runs on SIGHUP."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()


def load_config_or_report(path: str | None, prog: str) -> MeshConfig | None:
    """The config, or None after printing every problem (the caller exits with status 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


async def start_stage(
    app: StageApp, host: str, port: int, health_port: int = -1, admin_at: tuple[str, int] | None = None
) -> RunningStage:
    """Start serving ``app`` on ``host:port`` (port 0 picks a free port; the real one is returned); grpc.health.v1
    alone in plaintext on ``health_port`` unless it is -1; AdminService on the ``admin_at`` (host, port) listener
    instead of the stage's port when given."""
    server = new_server(app.options)
    for service in app.services:
        service.add(server)
    admin = AdminServicer(app)
    if admin_at is None:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(admin, server)
    health_servicer = add_health_and_reflection(server, app.service_names, app.reflection, admin=admin_at is None)
    credentials = app.certificates.credentials() if app.certificates is not None else None
    address = bind(server, host, port, f"{app.name} stage", credentials)
    await server.start()
    app.runtime.replica = advertised(address)
    running = RunningStage(app, server, health_servicer, address, admin)
    await running.set_serving(True)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    if health_port >= 0:
        # The same health servicer, so both listeners always report the same status; nothing else is served here.
        running.health_server = new_server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, running.health_server)
        running.health_address = bind(running.health_server, host, health_port, f"{app.name} stage's health")
        await running.health_server.start()
    if admin_at is not None:
        await running.serve_admin(*admin_at)
    app.readiness_listener = running.set_serving_soon
    return running


def settle_gc(full_every: int) -> None:
    """Once serving: move what start-up left alive out of the collector's sight, and make full collections rare.

    A request leaves none of its objects in reference cycles (tested), so what a full collection finds is
    little, while its pause grows with everything alive: ~40-90 ms at the edge holding ~1300 open streams,
    which was the shed replies' p99 under overload. Young collections still run as often as before.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, full_every)


def write_ready_file(
    path: str, stage: str, address: str, metrics_address: str = "", health_address: str = "", admin_address: str = ""
) -> None:
    """Tell a launcher where we listen: written atomically, so a reader never sees half of it."""
    info = {
        "stage": stage,
        "address": address,
        "metrics_address": metrics_address,
        "health_address": health_address,
        "admin_address": admin_address,
        "pid": os.getpid(),
    }
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


Build = Callable[[MeshConfig, Telemetry], StageApp]


async def _start_one(name: str, app: StageApp, cfg: MeshConfig) -> RunningStage:
    stage_cfg = cfg.stage(name)
    admin_at = (cfg.server.admin_host, stage_cfg.admin_port) if stage_cfg.admin_port >= 0 else None
    running = await start_stage(app, stage_cfg.host, stage_cfg.port, stage_cfg.health_port, admin_at)
    if stage_cfg.metrics_port >= 0:
        running.start_metrics(stage_cfg.host, stage_cfg.metrics_port)
    log.info(
        "stage=%s listening on %s over %s (metrics %s, health %s)",
        app.name,
        running.address,
        "TLS" if app.certificates is not None else "plaintext",
        running.metrics_address or "off",
        running.health_address or "on the stage's port only",
    )
    return running


async def serve_stages(
    builds: Sequence[tuple[str, Build]],
    cfg: MeshConfig,
    ready: Callable[[str], str | None],
    config_path: str | None = None,
) -> None:
    """Build the stages on the running loop (gRPC channels bind to it), serve until SIGTERM or SIGINT, drain.

    ``builds`` lists the stages this process serves, each callee before its caller: with several, each is
    registered as colocated once built, so its caller (built after it) calls it in memory. Every stage still serves
    its own gRPC service on its own port. ``ready(name)`` is where to write a stage's ready file, if anywhere.
    """
    running: list[RunningStage] = []
    with colocating() as local:
        for name, build in builds:
            app = build(cfg, build_telemetry(name))
            if len(builds) > 1 and app.handler is not None:
                local[name] = app.handler
            running.append(await _start_one(name, app, cfg))
    settle_gc(cfg.server.gc_full_every)
    for stage in running:
        path = ready(stage.app.name)
        if path:
            write_ready_file(
                path,
                stage.app.name,
                stage.address,
                stage.metrics_address,
                stage.health_address,
                stage.admin_address,
            )
        stage.admin.reload_config = lambda: load_config(config_path)

    def reload_all() -> None:
        for stage in running:
            stage.reload_in_background()

    await wait_for_stop_signal(reload_all)
    names = ", ".join(r.app.name for r in running)
    log.info("stage=%s draining (grace %.1fs)", names, cfg.server.drain_grace_s)
    await asyncio.gather(*(stage.stop(cfg.server.drain_grace_s) for stage in reversed(running)))
    log.info("stage=%s stopped", names)


async def serve(
    name: str,
    build: Build,
    cfg: MeshConfig,
    ready_file: str | None = None,
    config_path: str | None = None,
) -> None:
    """Build the stage on the running loop, serve until SIGTERM or SIGINT, drain."""
    await serve_stages([(name, build)], cfg, lambda _: ready_file, config_path)


def run_loop(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    """``asyncio.run`` on uvloop or on asyncio's own loop. With one stream per link carrying many calls,
    a stage's CPU goes mostly to task switches and socket events, where uvloop spends less."""
    if use_uvloop:
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)


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
    cfg = load_config_or_report(args.config, name)
    if cfg is None:
        return 2
    configure_logging(cfg.server.log_level, name)
    try:
        run_loop(serve(name, build, cfg, args.ready_file, args.config), cfg.server.uvloop)
    except (OSError, StartupError) as exc:
        log.error("%s", exc)
        return 1
    return 0
