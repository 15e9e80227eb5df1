"""Post stage logic: join tokens into text incrementally, apply stop sequences and max_tokens."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from orchestrator.core.aio import aclose
from orchestrator.core.errors import OtherError
from orchestrator.core.scope import Scope
from orchestrator.v1 import types_pb2


class StopScanner:
    """Finds stop sequences across token boundaries, holding back only text that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop sequence was found."""
        if not self._stops:
            return text, False
        text = self._pending + text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return text[:cut], True
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def feed_tokens(self, tokens: Sequence[str]) -> tuple[str, int, bool]:
        """Like :meth:`feed` for a batch: also says how many tokens it took to reach a stop."""
        if not self._stops:
            return "".join(tokens), len(tokens), False
        out = []
        for used, token in enumerate(tokens, 1):
            text, stopped = self.feed(token)
            out.append(text)
            if stopped:
                return "".join(out), used, True
        return "".join(out), len(tokens), False

    def flush(self) -> str:
        """What was held back, once the stream has ended without a stop."""
        out, self._pending = self._pending, ""
        return out


def _completion(
    start: types_pb2.InferenceStart | None,
    upstream_done: types_pb2.Completion | None,
    finish: types_pb2.FinishReason,
    tokens: int,
    scope: Scope,
) -> types_pb2.Completion:
    done = types_pb2.Completion(finish_reason=finish)
    if upstream_done is not None:
        done.usage.prompt_tokens = upstream_done.usage.prompt_tokens
        done.model = upstream_done.model
        done.timings.extend(upstream_done.timings)
    elif start is not None:
        # Cut short before the inference stage finished: report what its first message said.
        done.usage.prompt_tokens = start.prompt_tokens
        done.model = start.model
        done.timings.extend(start.timings)
    done.usage.completion_tokens = tokens
    done.timings.append(scope.timing())
    return done


async def process(
    request: types_pb2.PromptRequest,
    upstream: AsyncIterator[types_pb2.InferenceOutput],
    scope: Scope,
) -> AsyncIterator[types_pb2.PostOutput]:
    """Turn coalesced tokens into text deltas; end the stream at a stop sequence or max_tokens.

    Stopping early closes ``upstream``, which cancels generation below.
    """
    max_tokens = request.params.max_tokens
    scanner = StopScanner(request.params.stop)
    start: types_pb2.InferenceStart | None = None
    tokens = 0
    try:
        async for msg in upstream:
            if msg.HasField("start"):
                start = msg.start
            batch = list(msg.tokens)
            scope.tokens_in += len(batch)
            finish = types_pb2.FINISH_REASON_UNSPECIFIED
            if max_tokens and tokens + len(batch) >= max_tokens:
                batch = batch[: max_tokens - tokens]
                finish = types_pb2.FINISH_REASON_LENGTH
            text, used, stopped = scanner.feed_tokens(batch)
            scope.tokens_out = tokens + used
            if stopped:
                # The tokens up to and including the stop sequence count as generated.
                tokens += used
                yield types_pb2.PostOutput(
                    text=text,
                    tokens=used,
                    completion=_completion(start, None, types_pb2.FINISH_REASON_STOP, tokens, scope),
                )
                return
            tokens += len(batch)
            if msg.HasField("completion") or finish:
                upstream_done = msg.completion if msg.HasField("completion") else None
                if upstream_done is not None and not finish:
                    finish = upstream_done.finish_reason
                yield types_pb2.PostOutput(
                    text=text + scanner.flush(),
                    tokens=len(batch),
                    completion=_completion(start, upstream_done, finish, tokens, scope),
                )
                if upstream_done is None:
                    return  # cut at max_tokens: stop the generation below
                # The upstream's last message: let its call end by itself (OK), not by a cancel.
                async for _ in upstream:
                    pass
                return
            if text or batch:
                yield types_pb2.PostOutput(text=text, tokens=len(batch))
    finally:
        await aclose(upstream)
    raise OtherError("inference stage ended its stream without a completion", stage=scope.stage)
