"""The stages this process serves when it serves several (a colocated layout), by name: their RPC methods as the
runtime wraps them. ``serve_stages`` fills it, callee before caller; ``downstream_of`` calls a stage found here in
memory instead of over gRPC."""

from __future__ import annotations

from orchestrator.core.calls import Handler

COLOCATED: dict[str, Handler] = {}
