"""Telemetry hook points the runtime calls; the default records nothing and costs next to nothing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


class Telemetry:
    """Where the runtime reports what happens to requests.

    One instance is built per process and injected into the runtime (never a global),
    so tests can hold their own. Exporters (OTLP, Prometheus) subclass this.
    """

    def server_interceptors(self) -> Sequence[Any]:
        return ()

    def client_interceptors(self) -> Sequence[Any]:
        return ()

    def record_queue_depth(self, stage: str, depth: int) -> None:
        """Called when a stage's wait queue changes length."""

    def record_stage_latency(self, stage: str, seconds: float, outcome: str) -> None:
        """Called once per request when a stage is done with it."""
        log.debug("stage=%s outcome=%s latency_ms=%.2f", stage, outcome, seconds * 1000)

    def record_shed(self, stage: str, reason: str) -> None:
        """Called for every request a stage sheds."""
