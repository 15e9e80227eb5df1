"""Small asyncio helpers every layer uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


async def aclose(stream: AsyncIterator[Any]) -> None:
    """Close an async generator now (its ``finally`` runs here), not at garbage collection."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
