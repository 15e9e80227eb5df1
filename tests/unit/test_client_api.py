"""The client's public surface is pinned: changing it is a deliberate act."""

from __future__ import annotations

import orchestrator_client


def test_public_exports() -> None:
    assert sorted(orchestrator_client.__all__) == [
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
    for name in orchestrator_client.__all__:
        assert getattr(orchestrator_client, name) is not None


def test_build_request() -> None:
    req = orchestrator_client.build_request("hi", session="s", max_tokens=5, stop=["x"], meta={"k": "v"})
    assert (req.session.id, req.input, req.params.max_tokens, list(req.params.stop), dict(req.meta)) == (
        "s",
        "hi",
        5,
        ["x"],
        {"k": "v"},
    )
