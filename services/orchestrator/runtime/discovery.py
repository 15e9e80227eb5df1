"""Replicas found by DNS. A stage's ``endpoints`` may name ``dns:NAME:PORT`` (a Kubernetes headless Service): the
caller resolves every address the name has at start, again every ``network.resolve_interval_s``, and soon after a
call finds a replica unavailable, and hands the live set to ``Replicas.update``.

A failed lookup keeps the set in force: a DNS blip must not empty a stage's replicas, and replicas that are really
gone stop answering their health checks and are ejected anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

from orchestrator.core.config import NetworkConfig
from orchestrator.runtime.replicas import Replicas

log = logging.getLogger(__name__)

DNS_PREFIX = "dns:"
# However often calls fail, a name is looked up again at most this often.
MIN_LOOKUP_INTERVAL_S = 0.5


def split_endpoints(endpoints: Sequence[str]) -> tuple[list[str], list[tuple[str, int]]]:
    """Fixed ``host:port`` endpoints, and the ``(name, port)`` of each ``dns:NAME:PORT`` one."""
    fixed, names = [], []
    for endpoint in endpoints:
        if endpoint.startswith(DNS_PREFIX):
            name, _, port = endpoint.removeprefix(DNS_PREFIX).rpartition(":")
            names.append((name, int(port)))
        else:
            fixed.append(endpoint)
    return fixed, names


def _addresses(infos: Sequence[tuple[object, ...]], port: int) -> list[str]:
    out = []
    for family, *_rest, sockaddr in infos:
        host = str(sockaddr[0])  # type: ignore[index]
        out.append(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
    return sorted(dict.fromkeys(out))


def resolve_now(names: Sequence[tuple[str, int]]) -> list[str]:
    """Every address of ``names``, looked up at once (a stage's start, before it serves); [] for a name that has
    none yet."""
    out: list[str] = []
    for name, port in names:
        try:
            out += _addresses(socket.getaddrinfo(name, port, type=socket.SOCK_STREAM), port)
        except OSError as exc:
            log.warning("%s:%d resolves to nothing yet: %s", name, port, exc)
    return out


class Discovery:
    """Keeps ``replicas`` equal to ``fixed`` plus what ``names`` resolve to."""

    def __init__(
        self, replicas: Replicas, fixed: Sequence[str], names: Sequence[tuple[str, int]], network: NetworkConfig
    ) -> None:
        self.replicas = replicas
        self.fixed = list(fixed)
        self.names = list(names)
        self._interval_s = network.resolve_interval_s
        self._nudged = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.lookups = 0

    def start(self) -> None:
        """Begin looking up (on the running loop; idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    def nudge(self) -> None:
        """A replica was unavailable: look up again soon, it may have left."""
        self._nudged.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), self._interval_s)
            self._nudged.clear()
            found = await self._lookup(loop)
            if found is not None:
                self.replicas.update([*self.fixed, *found])
            await asyncio.sleep(MIN_LOOKUP_INTERVAL_S)

    async def _lookup(self, loop: asyncio.AbstractEventLoop) -> list[str] | None:
        """Every address the names have now, or None when a lookup failed (the set in force stays)."""
        self.lookups += 1
        out: list[str] = []
        for name, port in self.names:
            try:
                infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning(
                    "replicas of the %s stage: %s did not resolve (%s); keeping the ones known",
                    self.replicas.stage,
                    name,
                    exc,
                )
                return None
            out += _addresses(infos, port)
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
