"""The stage services: each stage module is a thin servicer over its pipeline logic, a ``build`` and ``main``.

What every stage's ``build`` shares is here: its runtime, its calls to the next stage and the services it
serves (its own RPC, and the same handler over stage links), all read from the stage graph.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from orchestrator.core.config import MeshConfig
from orchestrator.core.graph import CALLEE, EDGE, stage
from orchestrator.core.telemetry import Telemetry
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.link import link_service
from orchestrator.runtime.server import Service, StageApp
from orchestrator.runtime.stage import StageRuntime
from orchestrator.runtime.transport import downstream_of
from orchestrator.v1 import stages_pb2_grpc


def runtime_of(name: str, cfg: MeshConfig, telemetry: Telemetry) -> StageRuntime:
    """The stage's runtime: its admission from config, its span name from the graph."""
    record_input = name == EDGE and cfg.server.trace_text
    return StageRuntime.for_stage(name, cfg, telemetry, stage(name).rpc, record_input=record_input)


def callee_of(name: str, cfg: MeshConfig, telemetry: Telemetry) -> Downstream[Any]:
    """The stage's calls to the one it calls, over the configured transport."""
    if name not in CALLEE:
        raise ValueError(f"the {name} stage calls no other stage")
    return downstream_of(name, cfg, telemetry)


def app_of(
    name: str, runtime: StageRuntime, servicer: Any, downstream: Downstream[Any] | None = None, **extra: Any
) -> StageApp:
    """The stage as a servable app: its RPC, and the same handler over stage links."""
    spec = stage(name)
    add = getattr(stages_pb2_grpc, f"add_{spec.service}Servicer_to_server")
    services = [
        Service(spec.full_service, partial(add, servicer)),
        link_service(getattr(servicer, spec.method), runtime.telemetry),
    ]
    return StageApp(name, runtime, services, downstream=downstream, **extra)
