"""The five stage services. Each module is a thin servicer over its pipeline logic plus ``main``."""

from __future__ import annotations

from typing import Any

from orchestrator.config import MeshConfig
from orchestrator.runtime.downstream import Downstream
from orchestrator.runtime.telemetry import Telemetry
from orchestrator.v1 import stages_pb2, stages_pb2_grpc, types_pb2

# Each stage's service and its one streaming method.
RPCS: dict[str, tuple[str, str]] = {
    "rag": ("RagService", "Retrieve"),
    "assemble": ("AssembleService", "Assemble"),
    "inference": ("InferenceService", "Infer"),
    "post": ("PostService", "Process"),
    "stream": ("StreamService", "Submit"),
}


def service_name(stage: str) -> str:
    """Full gRPC service name of ``stage``, from the descriptor rather than a string literal."""
    return str(stages_pb2.DESCRIPTOR.services_by_name[RPCS[stage][0]].full_name)


def rpc_name(stage: str) -> str:
    """``package.Service/Method`` of ``stage``'s RPC (the span name)."""
    return f"{service_name(stage)}/{RPCS[stage][1]}"


def downstream(callee: str, cfg: MeshConfig, telemetry: Telemetry) -> Downstream[Any]:
    """A client of ``callee``'s replicas, as configured."""
    service, method = RPCS[callee]
    stub = getattr(stages_pb2_grpc, f"{service}Stub")
    output = stages_pb2.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type
    return Downstream(
        callee,
        cfg.stage(callee).addresses(),
        lambda ch: getattr(stub(ch), method),
        rpc_name(callee),
        telemetry,
        link_output=getattr(types_pb2, output.name).FromString if cfg.server.stage_links else None,
    )
