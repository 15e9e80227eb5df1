"""The ModelWorker interface and the registry that builds one from config."""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from orchestrator.config import WorkerConfig
from orchestrator.runtime.telemetry import Telemetry


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0


class ModelWorker(abc.ABC):
    """Generates tokens for a prompt.

    ``generate`` is an async generator. Aborting a generation is closing it
    (``aclose()``, or cancelling the task iterating it): implementations must stop
    their backend work in ``finally``. Blocking compute belongs in a thread, never
    on the event loop.
    """

    name: str = "worker"

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Yield the completion's tokens, at most ``request.max_tokens`` of them."""

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` as this worker counts them (for usage reporting)."""
        return len(text.split())

    async def close(self) -> None:
        """Release backend resources at shutdown."""


def build_worker(
    cfg: WorkerConfig,
    telemetry: Telemetry | None = None,
    env: Mapping[str, str] | None = None,
    on_breaker_change: Callable[[bool], None] | None = None,
) -> ModelWorker:
    """The worker ``cfg.kind`` names. Workers that call a backend get retries and a circuit breaker."""
    # Imported per kind: a stage pays (in start-up time and memory) only for the client it uses.
    worker: ModelWorker
    if cfg.kind == "echo":
        from orchestrator.workers.echo import EchoWorker

        worker = EchoWorker(cfg.echo)
        if cfg.name:
            worker.name = cfg.name
        return worker
    if cfg.kind == "openai":
        from orchestrator.workers.openai import OpenAIWorker, read_api_key

        worker = OpenAIWorker(cfg.openai, read_api_key(cfg.openai, dict(os.environ if env is None else env)))
    elif cfg.kind == "remote":
        from orchestrator.workers.remote import RemoteWorker

        worker = RemoteWorker(cfg.remote.address)
    else:
        raise ValueError(f"unknown worker kind {cfg.kind!r}; known: echo, openai, remote")
    from orchestrator.workers.resilient import CircuitBreaker, ResilientWorker

    breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_open_s, on_breaker_change, telemetry)
    return ResilientWorker(
        worker,
        retries=cfg.retries,
        backoff_s=cfg.retry_backoff_ms / 1000,
        breaker=breaker,
        telemetry=telemetry,
        name=cfg.name,
    )
