"""Which replicas of the next stage take new calls: all of them, less those that stopped answering.

A replica that goes silent (a partition drops packets and sends no reset) would otherwise keep receiving the
new calls of the sessions it owns until gRPC gives up on the connection. With two or more replicas, a stage
checks each one's health every ``network.health_interval_s``; one that misses ``network.health_timeout_s`` or
answers NOT_SERVING (draining, an open circuit breaker) is ejected: it goes to the end of every session's
rendezvous order, and the calls waiting on it that have received nothing are cancelled there and made again on
the next replica in their session's order. It is readmitted as soon as it answers SERVING again, and its
sessions return to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.calls import Call, Transport
from orchestrator.core.config import NetworkConfig
from orchestrator.core.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Waiting:
    """A call to one replica that has received nothing yet."""

    call: Call
    # Set when its replica was ejected and the call cancelled there: it is to be made again elsewhere.
    moved: bool = False


class Replicas:
    """The replicas of ``stage`` (one transport each) and which of them are ejected."""

    def __init__(
        self, stage: str, transports: Mapping[str, Transport], network: NetworkConfig, telemetry: Telemetry
    ) -> None:
        self.stage = stage
        self.transports = dict(transports)
        self.addresses = tuple(self.transports)
        self.ejected: set[str] = set()
        self._network = network
        self._telemetry = telemetry
        self._waiting: dict[str, set[Waiting]] = {addr: set() for addr in self.addresses}
        self._task: asyncio.Task[None] | None = None
        # One replica has nowhere to send its calls: nothing to check.
        self.checked = len(self.addresses) > 1

    def order(self, session: str) -> list[str]:
        """The replicas in the order ``session`` tries them: its rendezvous order, ejected ones last (a last
        resort, should every replica be ejected)."""
        order = rendezvous_order(session, self.addresses)
        if self.ejected:
            order = [a for a in order if a not in self.ejected] + [a for a in order if a in self.ejected]
        return order

    def waiting(self, addr: str, call: Call) -> Waiting | None:
        """Note a call on ``addr`` that has received nothing, until ``received`` says otherwise."""
        if not self.checked:
            return None
        if self._task is None:
            self._task = asyncio.create_task(self._watch())
        entry = Waiting(call)
        self._waiting[addr].add(entry)
        return entry

    def received(self, addr: str, entry: Waiting | None) -> None:
        """The call got its first message (or ended): it stays where it is, whatever happens to ``addr``."""
        if entry is not None:
            self._waiting[addr].discard(entry)

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self._check(addr) for addr in self.addresses))
            await asyncio.sleep(self._network.health_interval_s)

    async def _check(self, addr: str) -> None:
        healthy = await self.transports[addr].healthy(self._network.health_timeout_s)
        if healthy and addr in self.ejected:
            self.ejected.discard(addr)
            self._telemetry.record_ejected(self.stage, len(self.ejected))
            log.info("stage=%s replica=%s answers again; readmitted", self.stage, addr)
        elif not healthy and addr not in self.ejected:
            self.ejected.add(addr)
            self._telemetry.record_ejected(self.stage, len(self.ejected), ejection=True)
            moved = list(self._waiting[addr])
            log.warning(
                "stage=%s replica=%s missed its health check; ejected, %d waiting call(s) moved to other replicas",
                self.stage,
                addr,
                len(moved),
            )
            for entry in moved:
                entry.moved = True
                entry.call.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for transport in self.transports.values():
            await transport.close()
