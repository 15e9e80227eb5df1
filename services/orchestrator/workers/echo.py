"""EchoWorker: streams the prompt back word by word, deterministically, with configurable delays."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

from orchestrator.core.config import EchoConfig
from orchestrator.core.errors import InferenceError
from orchestrator.workers.base import GenerationRequest, ModelWorker

# A token is a word with the whitespace before it, so joining tokens restores the text.
_TOKEN = re.compile(r"\s*\S+")
_GATE_POLL_S = 0.005


def echo_tokens(text: str) -> list[str]:
    """The tokens EchoWorker produces for ``text`` (without a max_tokens cut)."""
    return _TOKEN.findall(text)


class EchoWorker(ModelWorker):
    name = "echo"

    def __init__(self, cfg: EchoConfig | None = None) -> None:
        self._cfg = cfg or EchoConfig()
        self._generations = 0

    def count_tokens(self, text: str) -> int:
        return len(echo_tokens(text))

    async def _wait_for_gate(self) -> None:
        gate = Path(self._cfg.gate_file)
        # A file gate works across processes; polling keeps it dependency-free.
        while not gate.exists():  # noqa: ASYNC110, ASYNC240 - a stat() per 5 ms is cheap
            await asyncio.sleep(_GATE_POLL_S)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        self._generations += 1
        if self._cfg.fail_every and self._generations % self._cfg.fail_every == 0:
            raise InferenceError(f"echo: generation {self._generations} fails, as echo.fail_every says")
        if self._cfg.gate_file:
            await self._wait_for_gate()
        if self._cfg.ttft_ms:
            await asyncio.sleep(self._cfg.ttft_ms / 1000)
        delay_s = self._cfg.token_delay_ms / 1000
        for i, match in enumerate(_TOKEN.finditer(request.prompt)):
            if i >= request.max_tokens:
                return
            if i and delay_s:
                await asyncio.sleep(delay_s)
            yield match.group()
