"""A connection flood against the edge at its default settings: its memory stays bounded, clients already connected
are served throughout, and new clients are served once the flood goes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator.launcher import Mesh
from tests.conftest import ROOT, clean_env, launch, mesh_client

pytestmark = pytest.mark.mesh

FLOOD = 10_000  # connections, each with one request; the edge accepts 1,500 at once by default
MAX_GROWTH_MIB = 50.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.fixture
def flood_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    # The flood's 1,500 requests arrive at once: with the query embedded (~4 ms of CPU each) the RAG stage would
    # rightly shed some, and this test is about the edge's connections, so BM25 keeps retrieval out of it.
    m = launch(tmp_path_factory.mktemp("flood"), ORCH_RAG_MODE="bm25")
    yield m
    m.stop()


async def test_a_connection_flood_costs_bounded_memory_and_no_service(flood_mesh: Mesh) -> None:
    edge = flood_mesh.stages["stream"].popen.pid
    async with mesh_client(flood_mesh.entry) as regular:
        await regular.complete("warm up", session="regular", max_tokens=2, timeout=20)
        before = rss_mib(edge)
        flood = subprocess.Popen(  # noqa: ASYNC220 - started and left running; waited for off the loop
            [sys.executable, "-m", "tests.tools.flood", flood_mesh.entry, str(FLOOD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=clean_env(),
        )
        try:
            assert flood.stdout is not None
            line = await asyncio.to_thread(flood.stdout.readline)
            outcomes = json.loads(line)
            held = rss_mib(edge)
            # Every connection was answered: served up to the bound, refused past it (UNAVAILABLE, at once).
            assert sum(outcomes.values()) == FLOOD, outcomes
            assert 1000 <= outcomes.get("ok", 0) <= 1500, outcomes
            assert set(outcomes) <= {"ok", "UNAVAILABLE"}, outcomes
            print(f"\nflood of {FLOOD}: {outcomes}; edge RSS {before:.0f} -> {held:.0f} MiB")
            assert held - before <= MAX_GROWTH_MIB
            # A client connected before the flood is served while it holds its connections.
            result = await regular.complete("still there?", session="regular", max_tokens=3, timeout=20)
            assert result.completion.usage.completion_tokens == 3
        finally:
            # Closing its stdin makes the flood let go of its connections.
            await asyncio.to_thread(flood.communicate, timeout=60)
    # New clients are served once it has gone.
    async with mesh_client(flood_mesh.entry) as fresh:
        result = await fresh.complete("and a new client?", session="fresh", max_tokens=3, timeout=20)
    assert result.completion.usage.completion_tokens == 3
