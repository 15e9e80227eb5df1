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
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from orchestrator.core.affinity import rendezvous_order
from orchestrator.core.calls import Call, Metadata, Transport
from orchestrator.core.config import NetworkConfig
from orchestrator.core.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Waiting:
    """A call to one replica that has received nothing yet."""

    call: Call
    # Set when its replica was ejected and the call cancelled there: it is to be made again elsewhere.
    moved: bool = False


class CountedCall:
    """A call that tells whoever counts calls (``Replicas``, ``RenewingTransport``) when it is over: the runtime
    cancels every call it made once done with it (a no-op for one that ended), so ``cancel`` is that moment, once.
    ``read`` is the call's own bound method: no cost per message."""

    __slots__ = ("_call", "_done", "read")

    def __init__(self, call: Call, done: Callable[[], None]) -> None:
        self._call = call
        self._done: Callable[[], None] | None = done
        self.read = call.read

    def cancel(self) -> bool:
        done, self._done = self._done, None
        if done is not None:
            done()
        return self._call.cancel()


class Replicas:
    """The replicas of ``stage`` (one transport each), which of them are ejected, and (when they are discovered)
    the set changing under way: ``update`` adds the new ones and lets the ones that left finish their calls."""

    def __init__(
        self,
        stage: str,
        transports: Mapping[str, Transport],
        network: NetworkConfig,
        telemetry: Telemetry,
        connect: Callable[[str], Transport] | None = None,
    ) -> None:
        self.stage = stage
        self.transports = dict(transports)
        self.addresses = tuple(self.transports)
        self.ejected: set[str] = set()
        self._network = network
        self._telemetry = telemetry
        self._connect = connect
        self._waiting: dict[str, set[Waiting]] = {addr: set() for addr in self.addresses}
        self._calls: Counter[str] = Counter()
        # Replicas that left the set with calls still under way: closed when the last one is over.
        self._leaving: dict[str, Transport] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def checked(self) -> bool:
        """One replica has nowhere to send its calls: nothing to check."""
        return len(self.addresses) > 1

    def order(self, session: str) -> list[str]:
        """The replicas in the order ``session`` tries them: its rendezvous order, ejected ones last (a last
        resort, should every replica be ejected)."""
        order = rendezvous_order(session, self.addresses)
        if self.ejected:
            order = [a for a in order if a not in self.ejected] + [a for a in order if a in self.ejected]
        return order

    def start(self, addr: str, request: Any, *, timeout: float | None, metadata: Metadata | None) -> Call:
        """A call to the replica at ``addr``, counted until the runtime is done with it."""
        call = self.transports[addr](request, timeout=timeout, metadata=metadata)
        self._calls[addr] += 1
        return CountedCall(call, partial(self._ended, addr))

    def _ended(self, addr: str) -> None:
        self._calls[addr] -= 1
        if self._calls[addr] <= 0:
            del self._calls[addr]
            leaving = self._leaving.pop(addr, None)
            if leaving is not None:
                self._close_soon(leaving)

    def update(self, addresses: Sequence[str]) -> None:
        """The replicas are now ``addresses``: new ones take their sessions' new calls at once; one that left takes
        no new call, and the calls under way on it finish there (a replica scaled down drains, it is not cut)."""
        wanted = tuple(dict.fromkeys(addresses))
        if set(wanted) == set(self.addresses):
            return
        if self._connect is None:
            raise RuntimeError(f"replicas of the {self.stage} stage were given without a way to connect to more")
        added = [a for a in wanted if a not in self.transports]
        removed = [a for a in self.addresses if a not in wanted]
        for addr in added:
            back = self._leaving.pop(addr) if addr in self._leaving else None  # it left and came back
            self.transports[addr] = back if back is not None else self._connect(addr)
            self._waiting.setdefault(addr, set())
        for addr in removed:
            transport = self.transports.pop(addr)
            self.ejected.discard(addr)
            self._waiting.pop(addr, None)
            if self._calls[addr] > 0:
                self._leaving[addr] = transport
            else:
                self._calls.pop(addr, None)
                self._close_soon(transport)
        self.addresses = tuple(a for a in wanted if a in self.transports)
        self._telemetry.record_ejected(self.stage, len(self.ejected))
        log.info("replicas of the %s stage: %d (+%d, -%d)", self.stage, len(self.addresses), len(added), len(removed))

    def _close_soon(self, transport: Transport) -> None:
        task = asyncio.ensure_future(transport.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def waiting(self, addr: str, call: Call) -> Waiting | None:
        """Note a call on ``addr`` that has received nothing, until ``received`` says otherwise."""
        if not self.checked:
            return None
        if self._task is None:
            self._task = asyncio.create_task(self._watch())
        entry = Waiting(call)
        self._waiting.setdefault(addr, set()).add(entry)
        return entry

    def received(self, addr: str, entry: Waiting | None) -> None:
        """The call got its first message (or ended): it stays where it is, whatever happens to ``addr``."""
        if entry is not None:
            self._waiting.get(addr, set()).discard(entry)

    async def _watch(self) -> None:
        while True:
            await asyncio.gather(*(self._check(addr) for addr in self.addresses))
            await asyncio.sleep(self._network.health_interval_s)

    async def _check(self, addr: str) -> None:
        transport = self.transports.get(addr)
        if transport is None:  # left the set while being checked
            return
        healthy = await transport.healthy(self._network.health_timeout_s)
        if addr not in self.transports:
            return
        if healthy and addr in self.ejected:
            self.ejected.discard(addr)
            self._telemetry.record_ejected(self.stage, len(self.ejected))
            log.info("stage=%s replica=%s answers again; readmitted", self.stage, addr)
        elif not healthy and addr not in self.ejected:
            self.ejected.add(addr)
            self._telemetry.record_ejected(self.stage, len(self.ejected), ejection=True)
            moved = list(self._waiting.get(addr, ()))
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
        for transport in (*self.transports.values(), *self._leaving.values()):
            await transport.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
