"""Stages that share a process: while a process builds its stages (callee first), each one's RPC method, as the
runtime wraps it, is registered here by name; ``downstream_of`` finds a callee registered here and calls it in memory
instead of over gRPC. Scoped to the build (a context variable), so one process can hold several meshes (tests,
the bench) without one's stages calling another's."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from orchestrator.core.calls import Handler

COLOCATED: ContextVar[dict[str, Handler]] = ContextVar("colocated", default={})  # noqa: B039 - never mutated


@contextlib.contextmanager
def colocating() -> Iterator[dict[str, Handler]]:
    """Register stages as they are built: a caller built inside the block calls the stages registered before it."""
    handlers: dict[str, Handler] = {}
    token = COLOCATED.set(handlers)
    try:
        yield handlers
    finally:
        COLOCATED.reset(token)
