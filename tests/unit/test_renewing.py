"""A caller's transport is made again when its certificate files change; calls finish where they started."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from orchestrator.runtime.transport import RenewingTransport
from orchestrator.v1 import types_pb2


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = 0

    async def read(self) -> Any:
        return None

    def cancel(self) -> bool:
        self.cancelled += 1
        return True


class FakeTransport:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False
        self.calls: list[FakeCall] = []

    def __call__(self, request: Any, *, timeout: float | None = None, metadata: Any = None) -> FakeCall:
        call = FakeCall()
        self.calls.append(call)
        return call

    async def healthy(self, timeout_s: float) -> bool:
        return True

    async def close(self) -> None:
        self.closed = True


class Factory:
    """Makes the fake transports, and keeps them."""

    def __init__(self) -> None:
        self.made: list[FakeTransport] = []

    def __call__(self) -> FakeTransport:
        self.made.append(FakeTransport(len(self.made)))
        return self.made[-1]


def renew(cert: Path) -> None:
    """The certificate file rewritten, with a modification time of its own whatever the clock's resolution."""
    cert.write_text("two, renewed")
    os.utime(cert, ns=(1, 1))


@pytest.fixture
def cert(tmp_path: Path) -> Path:
    path = tmp_path / "post.pem"
    path.write_text("one")
    return path


async def test_a_renewed_certificate_gets_a_new_transport_and_the_old_one_closes_after_its_calls(
    cert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RenewingTransport, "CHECK_S", 0.0)
    factory = Factory()
    made = factory.made
    renewing = RenewingTransport(factory, [str(cert)], "the inference stage")
    request = types_pb2.PromptRequest()
    under_way = renewing(request)
    assert len(made) == 1
    renew(cert)
    after = renewing(request)
    assert len(made) == 2 and renewing.renewals == 1
    assert made[1].calls and not made[0].closed  # the call under way keeps its transport open
    under_way.cancel()
    under_way.cancel()  # the runtime may cancel twice; counted once
    await asyncio.sleep(0)
    assert made[0].closed and not made[1].closed
    assert made[0].calls[0].cancelled == 2  # still passed through to the call itself
    after.cancel()
    await asyncio.sleep(0)
    assert not made[1].closed  # the current transport stays
    await renewing.close()
    assert made[1].closed


async def test_nothing_is_made_again_while_the_files_are_unchanged(cert: Path) -> None:
    factory = Factory()
    made = factory.made
    renewing = RenewingTransport(factory, [str(cert)], "x")
    for _ in range(100):
        renewing(types_pb2.PromptRequest()).cancel()
    assert len(made) == 1 and await renewing.healthy(1.0)
    await renewing.close()
