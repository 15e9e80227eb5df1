"""The five stage services. Each module is a thin servicer over its pipeline logic plus ``main``."""

from orchestrator.v1 import stages_pb2


def service_name(service: str) -> str:
    """Full gRPC service name, from the descriptor rather than a string literal."""
    return str(stages_pb2.DESCRIPTOR.services_by_name[service].full_name)
