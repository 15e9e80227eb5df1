"""Post logic: incremental joining, stop sequences across token boundaries, max_tokens."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from orchestrator.core.errors import OtherError
from orchestrator.core.scope import Scope
from orchestrator.pipeline.post import StopScanner, process
from orchestrator.v1 import types_pb2


def scan_all(stops: Sequence[str], pieces: Sequence[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = []
    for piece in pieces:
        text, stopped = scanner.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + scanner.flush(), False


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (["hello wor", "ld END more"], ("hello world ", True)),
        (["hello E", "N", "D"], ("hello ", True)),
        (["no stop here"], ("no stop here", False)),
        (["ends with E", "N"], ("ends with EN", False)),  # held back, then flushed at the end
        (["a", "STOP", "b"], ("a", True)),
    ],
)
def test_stop_scanner(pieces: list[str], expected: tuple[str, bool]) -> None:
    assert scan_all(["END", "STOP"], pieces) == expected


def test_scanner_holds_back_only_a_possible_prefix() -> None:
    scanner = StopScanner(["</answer>"])
    assert scanner.feed("text </ans") == ("text ", False)
    assert scanner.feed("wer") == ("", False)
    assert scanner.feed("> after") == ("", True)
    scanner = StopScanner(["</answer>"])
    assert scanner.feed("text </b>") == ("text </b>", False)


def test_feed_tokens_counts_tokens_up_to_the_stop() -> None:
    scanner = StopScanner(["C"])
    assert scanner.feed_tokens(["a", "b", "C", "d"]) == ("ab", 3, True)


def msgs(batches: list[list[str]], *, finish: int = types_pb2.FINISH_REASON_END) -> list[types_pb2.InferenceOutput]:
    out = []
    index = 0
    for i, batch in enumerate(batches):
        msg = types_pb2.InferenceOutput(tokens=batch, index=index)
        if i == 0:
            msg.start.model = "fake"
            msg.start.prompt_tokens = 7
        index += len(batch)
        if i == len(batches) - 1:
            msg.completion.finish_reason = finish  # type: ignore[assignment]
            msg.completion.usage.prompt_tokens = 7
            msg.completion.usage.completion_tokens = index
            msg.completion.model = "fake"
        out.append(msg)
    return out


class Upstream:
    """An upstream stream that records whether it was closed."""

    def __init__(self, items: list[types_pb2.InferenceOutput]) -> None:
        self.items = list(items)
        self.closed = False

    def __aiter__(self) -> Upstream:
        return self

    async def __anext__(self) -> types_pb2.InferenceOutput:
        if self.closed or not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def run(
    batches: list[list[str]], max_tokens: int = 100, stop: Sequence[str] = ()
) -> tuple[list[types_pb2.PostOutput], Upstream]:
    request = types_pb2.PromptRequest(
        request_id="r", params=types_pb2.GenerationParams(max_tokens=max_tokens, stop=stop)
    )
    up = Upstream(msgs(batches))
    out = [o async for o in process(request, up, Scope("post", "r"))]
    return out, up


async def test_joins_and_finishes_with_upstream_completion() -> None:
    out, _ = await run([["Hello"], [",", " world"]])
    assert "".join(o.text for o in out) == "Hello, world"
    done = out[-1].completion
    assert done.finish_reason == types_pb2.FINISH_REASON_END
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (7, 3)
    assert [t.stage for t in done.timings] == ["post"]


async def test_max_tokens_cuts_mid_batch() -> None:
    out, up = await run([["a", "b", "c"], ["d", "e"]], max_tokens=4)
    assert "".join(o.text for o in out) == "abcd"
    assert out[-1].completion.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert out[-1].completion.usage.completion_tokens == 4
    assert up.closed


async def test_stop_sequence_closes_upstream_and_reports_start_info() -> None:
    out, up = await run([["one", " two"], [" th", "ree", " four"]], stop=["three"])
    assert "".join(o.text for o in out) == "one two "
    done = out[-1].completion
    assert done.finish_reason == types_pb2.FINISH_REASON_STOP
    assert done.usage.completion_tokens == 4
    assert (done.model, done.usage.prompt_tokens) == ("fake", 7)
    assert up.closed


async def test_stream_without_completion_is_an_error() -> None:
    request = types_pb2.PromptRequest(request_id="r", params=types_pb2.GenerationParams(max_tokens=10))
    up = Upstream([types_pb2.InferenceOutput(tokens=["x"])])
    with pytest.raises(OtherError, match="without a completion"):
        _ = [o async for o in process(request, up, Scope("post", "r"))]


def test_stop_scanner_agrees_with_a_whole_text_search_for_any_split() -> None:
    import random

    rng = random.Random(42)
    alphabet = "ab <>/x"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = (text[: min(hits)], True) if hits else (text, False)
        assert scan_all(stops, pieces) == expected, (text, stops, pieces)
