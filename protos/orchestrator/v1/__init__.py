"""The orchestrator.v1 protocol for Python: the messages and services generated from the .proto files beside them
(``*_pb2*``: `make protos` writes them; do not edit) and ``status``, how a failed call's details travel."""
