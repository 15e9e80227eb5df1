"""Per-request, per-stage bookkeeping handed to stage logic."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Span

from orchestrator.core.telemetry import Telemetry
from orchestrator.v1 import types_pb2

_NO_TELEMETRY = Telemetry()


@dataclass
class Scope:
    """What a stage knows about the request it is working on, and where it reports.

    Stage logic fills in ``tokens_in``/``tokens_out``/``model``; the runtime puts them on the
    stage's span when the request ends.
    """

    stage: str
    request_id: str
    queue_s: float = 0.0
    admitted_at: float = field(default_factory=time.perf_counter)
    span: Span = trace.INVALID_SPAN
    telemetry: Telemetry = _NO_TELEMETRY
    tokens_in: int = 0
    tokens_out: int = 0
    model: str = ""
    # How long the request waited for slots in the stages below, once their timings are known.
    queued_below_s: float | None = None
    # The replica serving the request here (its listening address; "" in process).
    replica: str = ""

    def timing(self) -> types_pb2.StageTiming:
        """This stage's timing so far."""
        return types_pb2.StageTiming(
            stage=self.stage,
            queue_ms=self.queue_s * 1000,
            duration_ms=(time.perf_counter() - self.admitted_at) * 1000,
            replica=self.replica,
        )

    def saw(self, timings: Iterable[types_pb2.StageTiming]) -> None:
        """The stages below reported their timings: note how long the request queued in them."""
        self.queued_below_s = sum(t.queue_ms for t in timings) / 1000

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.admitted_at
