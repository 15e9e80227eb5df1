"""Workers: the OpenAI-compatible SSE client, error mapping, retries and the circuit breaker (fakes only)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from orchestrator.core.config import OpenAIConfig
from orchestrator.core.errors import ChannelClosed, InferenceError, InvalidRequest, Overloaded
from orchestrator.workers.base import GenerationRequest, ModelWorker
from orchestrator.workers.openai import OpenAIWorker, read_api_key, retry_after_s
from orchestrator.workers.resilient import CircuitBreaker, ResilientWorker

REQUEST = GenerationRequest(request_id="r", prompt="hello", max_tokens=5, stop=("x",), temperature=0.0)


def sse(*events: dict[str, object], done: bool = True) -> bytes:
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


def chat_chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict[str, object]:
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def worker(handler: Callable[[httpx.Request], httpx.Response], api: str = "chat", key: str = "") -> OpenAIWorker:
    cfg = OpenAIConfig(base_url="http://backend.test/v1", model="tiny", api=api)
    return OpenAIWorker(cfg, api_key=key, transport=httpx.MockTransport(handler))


async def tokens(w: ModelWorker, request: GenerationRequest = REQUEST) -> list[str]:
    return [t async for t in w.generate(request)]


async def test_chat_stream_is_parsed_and_the_request_is_right() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(chat_chunk(role=True), chat_chunk("Hel"), chat_chunk("lo"), chat_chunk(finish="length"))
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    assert await tokens(worker(handler, key="sk-secret")) == ["Hel", "lo"]
    sent = json.loads(seen[0].content)
    assert seen[0].url.path == "/v1/chat/completions"
    assert sent == {
        "stream": True,
        "max_tokens": 5,
        "temperature": 0.0,
        "model": "tiny",
        "stop": ["x"],
        "messages": [{"role": "user", "content": "hello"}],
    }
    assert seen[0].headers["authorization"] == "Bearer sk-secret"


async def test_completions_stream_is_parsed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/completions"
        assert json.loads(request.content)["prompt"] == "hello"
        events: list[dict[str, object]] = [
            {"choices": [{"text": "a", "finish_reason": None}]},
            {"choices": [{"text": "b", "finish_reason": "length"}]},
        ]
        return httpx.Response(200, content=sse(*events, done=False))

    assert await tokens(worker(handler, api="completions")) == ["a", "b"]


async def test_stream_that_never_finishes_is_an_error() -> None:
    # llama.cpp answers an over-long prompt with 200 and an empty body.
    with pytest.raises(InferenceError, match="without finishing"):
        await tokens(worker(lambda r: httpx.Response(200, content=b"")))


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "message"),
    [
        (
            429,
            {"retry-after": "3"},
            b'{"error": {"message": "slow down"}}',
            Overloaded,
            "rate limiting (HTTP 429): slow down",
        ),
        (503, {}, b"", ChannelClosed, "unavailable (HTTP 503)"),
        (
            400,
            {},
            b'{"error": {"message": "context too long"}}',
            InvalidRequest,
            "rejected the request (HTTP 400): context too long",
        ),
        (401, {}, b"{}", InferenceError, "credentials (HTTP 401)"),
        (404, {}, b"{}", InferenceError, "no such model"),
        (500, {}, b"boom", InferenceError, "failed (HTTP 500)"),
    ],
)
async def test_http_errors_map_to_our_errors(
    status: int, headers: dict[str, str], body: bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        await tokens(worker(lambda r: httpx.Response(status, content=body, headers=headers)))
    assert message in str(info.value)
    if status == 429:
        assert info.value.retry_after_s == 3.0  # type: ignore[attr-defined]


async def test_connection_refused_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ChannelClosed, match="unreachable"):
        await tokens(worker(handler))


def test_retry_after_accepts_seconds_and_dates() -> None:
    assert retry_after_s(httpx.Headers({"retry-after": "2.5"})) == 2.5
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    value = retry_after_s(httpx.Headers({"retry-after": later}))
    assert value is not None and 25 < value <= 30
    assert retry_after_s(httpx.Headers({})) is None


def test_api_key_from_file_wins_and_is_stripped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    assert read_api_key(OpenAIConfig(api_key_file=str(key_file)), {"OPENAI_API_KEY": "sk-env"}) == "sk-from-file"
    assert read_api_key(OpenAIConfig(), {"OPENAI_API_KEY": " sk-env "}) == "sk-env"


async def test_api_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ChannelClosed):
        await tokens(worker(handler, key="sk-very-secret"))
    assert "sk-very-secret" not in caplog.text


class FlakyWorker(ModelWorker):
    """Fails ``failures`` times before its first token (or after it, with ``after_first``)."""

    name = "flaky"

    def __init__(self, failures: int, error: Exception, after_first: bool = False) -> None:
        self.failures, self.error, self.after_first, self.calls = failures, error, after_first, 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self.calls += 1
        if self.after_first:
            yield "first"
        if self.calls <= self.failures:
            raise self.error
        for t in ("a", "b"):
            yield t


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def resilient(
    inner: ModelWorker,
    retries: int = 2,
    failures: int = 3,
    clock: Clock | None = None,
    changes: list[bool] | None = None,
) -> ResilientWorker:
    breaker = CircuitBreaker(
        failures, 10.0, on_change=(changes.append if changes is not None else None), clock=clock or Clock()
    )
    return ResilientWorker(inner, retries=retries, backoff_s=0.001, breaker=breaker)


async def test_retries_before_the_first_token() -> None:
    inner = FlakyWorker(2, ChannelClosed("down", stage="inference"))
    assert await tokens(resilient(inner)) == ["a", "b"]
    assert inner.calls == 3


async def test_retries_are_bounded() -> None:
    inner = FlakyWorker(5, ChannelClosed("down", stage="inference"))
    with pytest.raises(ChannelClosed):
        await tokens(resilient(inner, retries=2, failures=100))
    assert inner.calls == 3


async def test_never_retried_after_the_first_token() -> None:
    inner = FlakyWorker(1, ChannelClosed("lost", stage="inference"), after_first=True)
    got: list[str] = []
    with pytest.raises(ChannelClosed):
        async for t in resilient(inner).generate(REQUEST):
            got.append(t)
    assert got == ["first"] and inner.calls == 1  # no duplicated tokens


async def test_caller_errors_are_not_retried() -> None:
    inner = FlakyWorker(1, InvalidRequest("bad", stage="inference"))
    with pytest.raises(InvalidRequest):
        await tokens(resilient(inner))
    assert inner.calls == 1


async def test_long_retry_after_is_passed_to_the_caller_instead_of_slept() -> None:
    inner = FlakyWorker(1, Overloaded("busy", stage="inference", retry_after_s=30))
    with pytest.raises(Overloaded):
        await tokens(resilient(inner))
    assert inner.calls == 1


async def test_breaker_opens_fails_fast_then_half_opens_with_one_probe() -> None:
    clock, changes = Clock(), list[bool]()
    inner = FlakyWorker(3, ChannelClosed("down", stage="inference"))
    w = resilient(inner, retries=0, failures=3, clock=clock, changes=changes)
    for _ in range(3):
        with pytest.raises(ChannelClosed):
            await tokens(w)
    assert w.breaker.state == "open" and changes == [True]
    with pytest.raises(ChannelClosed, match="circuit breaker open") as info:
        await tokens(w)
    assert inner.calls == 3  # failed fast, the backend was not called
    assert info.value.retry_after_s == 10.0
    clock.now = 10.5
    assert await tokens(w) == ["a", "b"]  # the probe succeeds ...
    assert w.breaker.state == "closed" and changes == [True, False]  # ... and closes the breaker


async def test_failed_probe_reopens_the_breaker() -> None:
    clock = Clock()
    inner = FlakyWorker(10, InferenceError("500", stage="inference"))
    w = resilient(inner, retries=0, failures=1, clock=clock)
    with pytest.raises(InferenceError):
        await tokens(w)
    clock.now = 11
    with pytest.raises(InferenceError):
        await tokens(w)  # the probe
    assert w.breaker.state == "open"
