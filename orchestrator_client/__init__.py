"""Python client for prompt-orchestrator: submit a prompt to the mesh's edge and stream the answer.

async with AsyncOrchestratorClient("127.0.0.1:50055") as client:
    async for chunk in client.submit("What is backpressure?", session="alice"):
        print(chunk.text, end="")

Over TLS with an API key: ``AsyncOrchestratorClient(target, credentials=tls_credentials("ca.pem"), token=key)``.
"""

from orchestrator.v1.types_pb2 import Completion, FinishReason, PromptRequest, StreamChunk
from orchestrator_client._client import (
    AsyncOrchestratorClient,
    CompletionResult,
    OrchestratorClient,
    build_request,
    tls_credentials,
)
from orchestrator_client._errors import OrchestratorRpcError

__all__ = [
    "AsyncOrchestratorClient",
    "Completion",
    "CompletionResult",
    "FinishReason",
    "OrchestratorClient",
    "OrchestratorRpcError",
    "PromptRequest",
    "StreamChunk",
    "build_request",
    "tls_credentials",
]
