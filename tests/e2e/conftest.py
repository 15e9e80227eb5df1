"""Fixtures the end-to-end modules share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.otlp import OtlpReceiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/gRPC receiver, for a module's meshes to export their spans to."""
    r = OtlpReceiver().start()
    yield r
    r.stop()
