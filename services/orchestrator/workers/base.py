"""The ModelWorker interface: what the inference stage asks of a model backend."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass


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
