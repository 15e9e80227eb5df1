"""The multi-host tier: stages on separate hosts (network namespaces on one bridge), and real network faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.multihost.netns import Network, available

pytestmark = pytest.mark.multihost


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A fresh network of hosts; every namespace, rule and process is removed afterwards, pass or fail."""
    why = available()
    if why:
        pytest.skip(f"multi-host tier skipped: {why}")
    with Network(tmp_path) as net:
        yield net
