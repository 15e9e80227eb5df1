"""OpenAIWorker: streams completions from any OpenAI-compatible server (vLLM, llama.cpp, TGI, Ollama, OpenAI)."""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from orchestrator.core.config import OpenAIConfig
from orchestrator.core.errors import ChannelClosed, InferenceError, InvalidRequest, Overloaded
from orchestrator.workers.base import GenerationRequest, ModelWorker

log = logging.getLogger(__name__)

_MAX_ERROR_BODY = 4096
_MAX_MESSAGE = 200


def read_api_key(cfg: OpenAIConfig, env: Mapping[str, str]) -> str:
    """The API key from ``api_key_file`` or the ``api_key_env`` variable; empty for local servers."""
    if cfg.api_key_file:
        return Path(cfg.api_key_file).read_text(encoding="utf-8").strip()
    return env.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""


def retry_after_s(headers: httpx.Headers) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _backend_message(body: bytes) -> str:
    """The backend's own error message, shortened; never the request."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        message = err.get("message", "") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        message = ""
    message = " ".join(str(message).split())
    return message[:_MAX_MESSAGE] + ("..." if len(message) > _MAX_MESSAGE else "")


def map_http_error(status: int, headers: httpx.Headers, body: bytes) -> Exception:
    """One mapping from a backend's HTTP failure to our error family, with a safe message."""
    detail = _backend_message(body)
    suffix = f": {detail}" if detail else ""
    retry = retry_after_s(headers)
    if status == 429:
        return Overloaded(f"model backend is rate limiting (HTTP 429){suffix}", retry_after_s=retry or 1.0)
    if status in (502, 503, 504):
        return ChannelClosed(f"model backend is unavailable (HTTP {status})", retry_after_s=retry)
    if status in (400, 413, 422):
        return InvalidRequest(f"model backend rejected the request (HTTP {status}){suffix}")
    if status in (401, 403):
        return InferenceError(f"model backend refused the worker's credentials (HTTP {status})")
    if status == 404:
        return InferenceError("model backend has no such model or endpoint (HTTP 404)")
    return InferenceError(f"model backend failed (HTTP {status})")


class OpenAIWorker(ModelWorker):
    """Streams ``/v1/completions`` or ``/v1/chat/completions`` with ``stream: true`` over SSE.

    Closing the generation (client cancel, deadline) closes the HTTP response, which
    servers such as llama.cpp and vLLM treat as an abort.
    """

    def __init__(self, cfg: OpenAIConfig, api_key: str = "", transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._cfg = cfg
        self.name = cfg.model or "openai"
        headers = {"Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            base_url=cfg.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            transport=transport,
        )

    def _payload(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"stream": True, "max_tokens": request.max_tokens, "temperature": request.temperature}
        if self._cfg.model:
            body["model"] = self._cfg.model
        if request.stop:
            body["stop"] = list(request.stop)
        if self._cfg.api == "chat":
            body["messages"] = [{"role": "user", "content": request.prompt}]
            return "/chat/completions", body
        body["prompt"] = request.prompt
        return "/completions", body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        path, body = self._payload(request)
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    raw = await response.aread()
                    raise map_http_error(response.status_code, response.headers, raw[:_MAX_ERROR_BODY])
                finished = False
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, other SSE fields
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    text, finish = self._parse(data)
                    if text:
                        yield text
                    if finish:
                        finished = True
                if not finished:
                    # llama.cpp answers an over-long prompt with HTTP 200 and an empty stream.
                    raise InferenceError("model backend ended the stream without finishing")
        except httpx.ConnectError:
            raise ChannelClosed("model backend is unreachable") from None
        except httpx.TimeoutException as exc:
            log.warning("model backend timed out: %s", type(exc).__name__)
            raise ChannelClosed("model backend timed out") from None
        except httpx.HTTPError as exc:
            log.warning("model backend stream failed: %s", type(exc).__name__)
            raise ChannelClosed("model backend connection failed mid-stream") from None

    def _parse(self, data: str) -> tuple[str, str | None]:
        try:
            chunk = json.loads(data)
            choice = chunk["choices"][0] if chunk.get("choices") else {}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise InferenceError("model backend sent a malformed stream event") from None
        if "error" in chunk:
            raise InferenceError("model backend reported an error mid-stream")
        # A chat stream's first delta carries only the role, no content.
        chat = self._cfg.api == "chat"
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        return text or "", choice.get("finish_reason")

    async def close(self) -> None:
        await self._client.aclose()
