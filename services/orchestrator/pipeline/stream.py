"""Stream stage logic: client-facing framing (sequence numbers, final chunk) and output sinks."""

from __future__ import annotations

import abc
import logging
from collections.abc import AsyncIterator, Sequence

from orchestrator.core.scope import Scope
from orchestrator.v1 import types_pb2

log = logging.getLogger(__name__)


class OutputSink(abc.ABC):
    """Receives every chunk a request produces, in order. The gRPC response itself is
    one sink (the stage yields to it); others observe the same chunks."""

    @abc.abstractmethod
    def write(self, request: types_pb2.PromptRequest, chunk: types_pb2.StreamChunk) -> None:
        """Called for each chunk; must not block."""

    def close(self, request: types_pb2.PromptRequest) -> None:
        """Called once when the request's stream ends, completed or not."""


class LogSink(OutputSink):
    """Logs each finished completion as ``session: text``. Off by default: the text is user data."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log
        self._parts: dict[str, list[str]] = {}

    def write(self, request: types_pb2.PromptRequest, chunk: types_pb2.StreamChunk) -> None:
        parts = self._parts.setdefault(request.request_id, [])
        parts.append(chunk.text)
        if chunk.HasField("completion"):
            del self._parts[request.request_id]
            self._log.info("%s: %s", request.session.id, "".join(parts))

    def close(self, request: types_pb2.PromptRequest) -> None:
        self._parts.pop(request.request_id, None)


async def frame(
    request: types_pb2.PromptRequest,
    upstream: AsyncIterator[types_pb2.PostOutput],
    scope: Scope,
    sinks: Sequence[OutputSink] = (),
) -> AsyncIterator[types_pb2.StreamChunk]:
    """Number the text deltas and finish with a chunk carrying usage and per-stage timings."""
    sequence = 0
    try:
        async for post in upstream:
            scope.tokens_in += post.tokens
            if not post.text and not post.HasField("completion"):
                continue
            chunk = types_pb2.StreamChunk(sequence=sequence, text=post.text, request_id=request.request_id)
            if post.HasField("completion"):
                scope.saw(post.completion.timings)
                chunk.completion.CopyFrom(post.completion)
                chunk.completion.timings.append(scope.timing())
                if scope.span.is_recording():
                    chunk.trace_id = format(scope.span.get_span_context().trace_id, "032x")
            sequence += 1
            scope.tokens_out += post.tokens
            scope.telemetry.record_tokens(scope.stage, post.tokens)
            for sink in sinks:
                sink.write(request, chunk)
            yield chunk
    finally:
        for sink in sinks:
            sink.close(request)
