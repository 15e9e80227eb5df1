"""The stage services: each stage module is a thin servicer over its pipeline logic, a ``build`` and ``main``.

What every stage's ``build`` shares is here: its runtime and the services it
serves (its own RPC, and the same handler over stage links), all read from the stage graph.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import grpc

from orchestrator.core.calls import Handler, connection_limits, server_options
from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import EDGE, Stage, stage
from orchestrator.core.requests import decode_request
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.link import link_service
from orchestrator.runtime.security import server_certificates
from orchestrator.runtime.server import Service, StageApp
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.tenants import KeyRing


def module(name: str) -> ModuleType:
    """The module of the stage called ``name`` in the graph: its ``NAME``, ``build`` and ``main``."""
    return importlib.import_module(f"{__name__}.{stage(name).name}")


def runtime_of(name: str, cfg: MeshConfig, telemetry: Telemetry) -> StageRuntime:
    """The stage's runtime: its admission from config, its span name from the graph, the API keys if any."""
    record_input = name == EDGE and cfg.server.trace_text
    keys = KeyRing(cfg.auth.keys_file) if cfg.auth.keys_file else None
    return StageRuntime.for_stage(name, cfg, telemetry, stage(name).rpc, record_input=record_input, keys=keys)


def rpc_service(spec: Stage, handler: Handler) -> Service:
    """The stage's RPC. Its requests are decoded by ``decode_request``, which never raises: a body that is not
    a PromptRequest reaches the runtime, which answers INVALID_ARGUMENT naming the stage (gRPC's own decoding
    would answer UNKNOWN, with the parser's exception text and no stage)."""
    method = grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=decode_request, response_serializer=spec.output.SerializeToString
    )
    rpcs = grpc.method_handlers_generic_handler(spec.full_service, {spec.method: method})
    return Service(spec.full_service, lambda server: server.add_generic_rpc_handlers((rpcs,)))


def app_of(
    name: str,
    cfg: MeshConfig,
    runtime: StageRuntime,
    servicer: Any,
    downstream: Downstream[Any] | None = None,
    **extra: Any,
) -> StageApp:
    """The stage as a servable app: its RPC, and the same handler over stage links."""
    spec = stage(name)
    handler = getattr(servicer, spec.method)
    links = link_service(handler, runtime.telemetry, stage=name, max_message_bytes=cfg.server.max_message_bytes)
    services = [rpc_service(spec, handler), links]
    options = (*server_options(cfg.server, cfg.network), *connection_limits(cfg.stage(name)))
    certificates = server_certificates(cfg.tls, name)
    if runtime.dead_letters is not None:  # letters recorded before the stop are written before it exits
        extra.setdefault("closers", []).append(runtime.dead_letters.close)
    return StageApp(
        name,
        runtime,
        services,
        options=options,
        certificates=certificates,
        reflection=cfg.server.reflection,
        handler=handler,
        downstream=downstream,
        **extra,
    )
