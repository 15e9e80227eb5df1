"""The one place a worker config becomes a worker."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from orchestrator.core.calls import Options
from orchestrator.core.config import WorkerConfig
from orchestrator.core.telemetry import Telemetry
from orchestrator.workers.base import ModelWorker


def _echo(cfg: WorkerConfig, env: Mapping[str, str], options: Options) -> ModelWorker:
    from orchestrator.workers.echo import EchoWorker

    return EchoWorker(cfg.echo)


def _openai(cfg: WorkerConfig, env: Mapping[str, str], options: Options) -> ModelWorker:
    from orchestrator.workers.openai import OpenAIWorker, read_api_key

    return OpenAIWorker(cfg.openai, read_api_key(cfg.openai, env))


def _remote(cfg: WorkerConfig, env: Mapping[str, str], options: Options) -> ModelWorker:
    from orchestrator.workers.remote import RemoteWorker

    return RemoteWorker(cfg.remote.address, options=options)


# Each kind imports its client only when built: a stage pays (start-up time, memory) only for the one it uses.
BUILDERS: dict[str, Callable[[WorkerConfig, Mapping[str, str], Options], ModelWorker]] = {
    "echo": _echo,
    "openai": _openai,
    "remote": _remote,
}
# Local and deterministic: nothing to retry, no breaker.
_UNWRAPPED = frozenset({"echo"})


def build_worker(
    cfg: WorkerConfig,
    telemetry: Telemetry | None = None,
    env: Mapping[str, str] | None = None,
    on_breaker_change: Callable[[bool], None] | None = None,
    stage: str = "",
    channel_options: Options = (),
) -> ModelWorker:
    """The worker ``cfg.kind`` names. Workers that call a backend get retries and a circuit breaker, whose
    metrics carry ``stage``; one that calls over gRPC uses ``channel_options`` (keepalive, limits)."""
    build = BUILDERS.get(cfg.kind)
    if build is None:
        raise ValueError(f"unknown worker kind {cfg.kind!r}; known: {', '.join(BUILDERS)}")
    worker = build(cfg, os.environ if env is None else env, channel_options)
    if cfg.kind in _UNWRAPPED:
        if cfg.name:
            worker.name = cfg.name
        return worker
    from orchestrator.workers.resilient import CircuitBreaker, ResilientWorker

    breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_open_s, on_breaker_change, telemetry, stage=stage)
    return ResilientWorker(
        worker,
        retries=cfg.retries,
        backoff_s=cfg.retry_backoff_ms / 1000,
        breaker=breaker,
        telemetry=telemetry,
        name=cfg.name,
        stage=stage,
    )
