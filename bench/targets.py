"""What the bench measures: the mesh and its floors, each answering PromptRequests with StreamChunks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import grpc

from orchestrator.core.config import load_config
from orchestrator.core.graph import STAGES
from orchestrator.launcher import LaunchError, Mesh, start_mesh, wait_ready_file
from orchestrator.stages.local import LocalPipeline
from orchestrator.v1 import types_pb2
from orchestrator_client import AsyncOrchestratorClient, build_request

# The folder that holds the bench package: floor processes run from it.
ROOT = Path(__file__).resolve().parents[1]

SINGLE_HOP = "single-hop floor"
BARE_CHAIN = "bare chain floor"
LINK_CHAIN = "link chain floor"
SHED_FLOOR = "shed floor"

# Long enough that the echo worker always has more tokens than any preset asks for.
BENCH_INPUT = "How do bounded queues and load shedding keep streaming latency low under overload? " + " ".join(
    f"word{i}" for i in range(200)
)


class Target:
    """Something that answers PromptRequests with StreamChunks; ``pids`` are its server processes."""

    name = "target"
    pids: dict[str, int]

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop what the target started."""


class GrpcTarget(Target):
    def __init__(
        self,
        name: str,
        address: str,
        pids: dict[str, int],
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.pids = pids
        self.client = AsyncOrchestratorClient(address, credentials=credentials, token=token)

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        def one(i: int) -> AsyncIterator[types_pb2.StreamChunk]:
            return self.client.submit_request(
                build_request(BENCH_INPUT, session=f"bench-{i % 256}", max_tokens=tokens), timeout=120
            )

        return one

    async def close(self) -> None:
        await self.client.close()


class MeshTarget(GrpcTarget):
    def __init__(
        self, mesh: Mesh, credentials: grpc.ChannelCredentials | None = None, token: str | None = None
    ) -> None:
        pids = {p.key: p.popen.pid for procs in mesh.replicas.values() for p in procs}
        super().__init__("mesh", mesh.entry, pids, credentials, token)
        self.mesh = mesh
        self.owns_mesh = True

    def client_of(self, name: str, token: str) -> MeshTarget:
        """Another client of the same mesh, with its own API key (a tenant); closing it leaves the mesh running."""
        other = MeshTarget(self.mesh, token=token)
        other.name, other.owns_mesh = name, False
        return other

    async def close(self) -> None:
        await super().close()
        if self.owns_mesh:
            await asyncio.to_thread(self.mesh.stop)


class HopTarget(GrpcTarget):
    """Bare grpc.aio processes: one (the single-hop floor) or a relay chain (the bare chain floor)."""

    def __init__(self, name: str, procs: list[subprocess.Popen[bytes]], address: str) -> None:
        super().__init__(name, address, {f"hop{i}": proc.pid for i, proc in enumerate(procs)})
        self.procs = procs

    async def close(self) -> None:
        await super().close()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            await asyncio.to_thread(proc.wait, 10)


class LocalTarget(Target):
    def __init__(self, env: dict[str, str]) -> None:
        self.name = "in-process floor"
        self.pipeline = LocalPipeline(load_config(env=env))
        self.pids = {"bench": os.getpid()}

    def submit(self, tokens: int) -> Callable[[int], AsyncIterator[types_pb2.StreamChunk]]:
        def one(i: int) -> AsyncIterator[types_pb2.StreamChunk]:
            return self.pipeline.submit(build_request(BENCH_INPUT, session=f"bench-{i % 256}", max_tokens=tokens))

        return one


def mesh_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "OTEL_"))}
    for stage in STAGES:
        env[f"ORCH_{stage.upper()}_PORT"] = "0"
        env[f"ORCH_{stage.upper()}_METRICS_PORT"] = "-1"
    env["ORCH_SERVER_LOG_LEVEL"] = "WARNING"
    env["ORCH_DLQ_STORE"] = "off"  # on only where a scenario measures it
    # The mesh scenarios measure the orchestration against floors that retrieve nothing: BM25 over the bundled
    # corpus (~0.03 ms). Embedding each query (~4 ms of CPU) is the retrieval scenario's to measure.
    env["ORCH_RAG_MODE"] = "bm25"
    env.update(extra)
    return env


async def start_mesh_target(
    run_dir: Path,
    extra: dict[str, str],
    cores: Sequence[int] = (),
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> MeshTarget:
    """The mesh, its stages on free ports; with ``cores``, every stage process confined to those CPUs; its client
    connects with ``credentials`` (TLS) and ``token`` (an API key) when given."""
    wrap = ["taskset", "-c", ",".join(map(str, cores))] if cores else []
    mesh = await asyncio.to_thread(start_mesh, run_dir, env=mesh_env(extra), timeout_s=60, wrap=wrap)
    return MeshTarget(mesh, credentials, token)


@contextlib.asynccontextmanager
async def mesh_running(
    run_dir: Path,
    extra: dict[str, str],
    name: str | None = None,
    cores: Sequence[int] = (),
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
) -> AsyncIterator[MeshTarget]:
    """``start_mesh_target`` for the length of a block, named ``name`` in the results; closed however it ends."""
    mesh = await start_mesh_target(run_dir, extra, cores, credentials, token)
    if name is not None:
        mesh.name = name
    try:
        yield mesh
    finally:
        await mesh.close()


def _event_loop() -> str:
    """The event loop the stages run on: floors run on it too, so a ratio compares like with like."""
    return "uvloop" if load_config(env=mesh_env({})).server.uvloop else "asyncio"


async def _start_hop_process(
    run_dir: Path, next_address: str | None, links: bool, refuse: bool = False
) -> tuple[subprocess.Popen[bytes], str]:
    ready = Path(tempfile.mkdtemp(dir=run_dir)) / "hop.ready"
    argv = [sys.executable, "-m", "bench.hop", "--ready-file", str(ready), "--event-loop", _event_loop()]
    if next_address:
        argv += ["--next", next_address]
    if links:
        argv.append("--links")
    if refuse:
        argv.append("--shed")
    proc = await asyncio.to_thread(subprocess.Popen, argv, cwd=ROOT)
    try:
        address = (await asyncio.to_thread(wait_ready_file, "floor", proc, ready, None, 30))["address"]
    except LaunchError:
        proc.kill()
        raise
    # The hop server has no health service: a channel that connects is enough.
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
    return proc, address


async def start_hop(run_dir: Path, processes: int = 1, stage_links: bool = False) -> HopTarget:
    """The single-hop floor (one process), or a chain of ``processes`` relaying to the last one: the bare chain
    floor (a gRPC call per request per hop) or, with ``stage_links``, the link chain floor."""
    procs: list[subprocess.Popen[bytes]] = []
    address: str | None = None
    try:
        for _ in range(processes):
            proc, address = await _start_hop_process(run_dir, address, stage_links)
            procs.append(proc)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    assert address is not None
    name = SINGLE_HOP if processes == 1 else (LINK_CHAIN if stage_links else BARE_CHAIN)
    return HopTarget(name, procs, address)


async def start_shed_floor(run_dir: Path) -> HopTarget:
    """One process that refuses every request at once, as a shed: what a shed reply costs the load generator and
    one hop, measured at the same offered rate as the mesh's."""
    proc, address = await _start_hop_process(run_dir, None, False, refuse=True)
    return HopTarget(SHED_FLOOR, [proc], address)
