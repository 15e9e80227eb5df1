"""TLS at the edge and mutual TLS between the stages, with real certificates made by ``deploy/tls/make-certs.sh``
for each test module: what is refused (and how), and a certificate rotated under open streams."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpc_health.v1.health_pb2_grpc import HealthStub

from orchestrator.core.graph import STAGES
from orchestrator.launcher import Mesh, spawn_stage, wait_ready_file
from orchestrator.v1 import stages_pb2_grpc, types_pb2
from orchestrator.v1.admin_pb2 import GetStatusRequest
from orchestrator.v1.admin_pb2_grpc import AdminServiceStub
from orchestrator_client import AsyncOrchestratorClient, OrchestratorRpcError, tls_credentials
from tests.conftest import BIN, clean_env, launch, make_certs, orchestrator_cli, poll, stop_process

pytestmark = pytest.mark.mesh


def tls_env(certs: Path, *, client_ca: bool = True, **extra: str) -> dict[str, str]:
    env = {
        "ORCH_TLS_CERT_FILE": f"{certs}/{{stage}}.pem",
        "ORCH_TLS_KEY_FILE": f"{certs}/{{stage}}.key",
        "ORCH_TLS_CA_FILE": f"{certs}/ca.pem",
    }
    if client_ca:
        env["ORCH_TLS_CLIENT_CA_FILE"] = f"{certs}/ca.pem"
    return env | extra


def client_of(certs: Path, name: str = "client") -> grpc.ChannelCredentials:
    return tls_credentials(f"{certs}/ca.pem", f"{certs}/{name}.pem", f"{certs}/{name}.key")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_certs(tmp_path_factory.mktemp("certs"))
    make_certs(path, "expired", DAYS="-1")
    return path


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA the mesh does not trust, and certificates it signed."""
    return make_certs(tmp_path_factory.mktemp("other-ca"))


@pytest.fixture(scope="module")
def tls_mesh(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Mesh]:
    probes = {f"ORCH_{name.upper()}_HEALTH_PORT": "0" for name in STAGES}
    m = launch(tmp_path_factory.mktemp("tls-mesh"), **tls_env(certs), **probes)
    yield m
    m.stop()


async def test_a_client_with_the_mesh_ca_and_its_certificate_is_served(tls_mesh: Mesh, certs: Path) -> None:
    async with AsyncOrchestratorClient(tls_mesh.entry, credentials=client_of(certs)) as client:
        result = await client.complete("What does mutual TLS prove?", session="tls", max_tokens=6, timeout=20)
    assert result.completion.usage.completion_tokens == 6
    assert [t.stage for t in result.completion.timings] == ["rag", "assemble", "inference", "post", "stream"]


@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "expired certificate", "another CA"])
async def test_the_edge_refuses_a_client_it_cannot_trust(tls_mesh: Mesh, certs: Path, other: Path, client: str) -> None:
    credentials = {
        "plaintext": None,
        "no client certificate": tls_credentials(f"{certs}/ca.pem"),
        "expired certificate": client_of(certs, "expired"),
        "another CA": tls_credentials(f"{certs}/ca.pem", f"{other}/client.pem", f"{other}/client.key"),
    }[client]
    async with AsyncOrchestratorClient(tls_mesh.entry, credentials=credentials) as c:
        with pytest.raises(OrchestratorRpcError) as info:
            await c.complete("let me in", session="intruder", max_tokens=2, timeout=5)
    # The handshake fails: gRPC reports it as UNAVAILABLE, and no request reached any stage.
    assert info.value.code == grpc.StatusCode.UNAVAILABLE, info.value


async def test_a_client_that_does_not_trust_the_mesh_ca_refuses_the_edge(tls_mesh: Mesh, other: Path) -> None:
    async with AsyncOrchestratorClient(tls_mesh.entry, credentials=client_of(other)) as c:
        with pytest.raises(OrchestratorRpcError) as info:
            await c.complete("who are you?", session="wary", max_tokens=2, timeout=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_stage_takes_calls_only_from_the_stage_that_calls_it(tls_mesh: Mesh, certs: Path) -> None:
    """A certificate the mesh CA signed is not enough below the edge: it must name the calling stage."""
    request = types_pb2.PromptRequest(session=types_pb2.SessionId(id="s"), input="skip the queue")
    for name in ("client", "rag"):  # a client's certificate, and another stage's
        async with grpc.aio.secure_channel(tls_mesh.address("inference"), client_of(certs, name)) as channel:
            call = stages_pb2_grpc.InferenceServiceStub(channel).Infer(request, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        assert "only from the post stage" in (info.value.details() or "")


@pytest.mark.parametrize("links", ["true", "false"])
async def test_a_caller_refuses_a_callee_whose_certificate_names_another_stage(
    tmp_path: Path, certs: Path, links: str
) -> None:
    """A post stage calls an inference stage that serves the assemble stage's certificate (signed by the mesh CA,
    naming the wrong stage): post refuses it, and its caller gets UNAVAILABLE naming inference."""
    env = clean_env(**tls_env(certs, ORCH_SERVER_STAGE_LINKS=links), ORCH_INFERENCE_METRICS_PORT="-1")
    procs = []
    try:
        wrong = env | {"ORCH_TLS_CERT_FILE": f"{certs}/assemble.pem", "ORCH_TLS_KEY_FILE": f"{certs}/assemble.key"}
        inference = spawn_stage("inference", wrong, tmp_path / "inference.ready", tmp_path / "inference.log")
        procs.append(inference)
        address = wait_ready_file("inference", inference, tmp_path / "inference.ready", None, 30)["address"]
        env |= {"ORCH_INFERENCE_ENDPOINTS": address, "ORCH_POST_METRICS_PORT": "-1"}
        post = spawn_stage("post", env, tmp_path / "post.ready", tmp_path / "post.log")
        procs.append(post)
        address = wait_ready_file("post", post, tmp_path / "post.ready", None, 30)["address"]
        request = types_pb2.PromptRequest(session=types_pb2.SessionId(id="s"), input="who answers?")
        async with grpc.aio.secure_channel(address, client_of(certs, "stream")) as channel:  # as the edge would
            call = stages_pb2_grpc.PostServiceStub(channel).Process(request, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
        err = OrchestratorRpcError.from_call_error(info.value)
        assert (err.code, err.stage) == (grpc.StatusCode.UNAVAILABLE, "inference"), err
    finally:
        for proc in procs:
            stop_process(proc)


def test_probes_that_cannot_do_tls_get_health_and_nothing_else(tls_mesh: Mesh) -> None:
    """The plaintext health port (kubelet's gRPC probes): health answers, no other service is there."""
    for name in STAGES:
        with grpc.insecure_channel(tls_mesh.stages[name].health_address) as channel:
            reply = HealthStub(channel).Check(HealthCheckRequest(service="orchestrator.liveness"), timeout=5)
            assert reply.status == HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.RpcError) as info:
                AdminServiceStub(channel).GetStatus(GetStatusRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def served_certificate(address: str, certs: Path) -> bytes:
    """The certificate the server at ``address`` presents to a new connection (DER)."""
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    context.load_cert_chain(certs / "client.pem", certs / "client.key")
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_a_rotated_certificate_is_served_to_new_connections_while_open_streams_finish(
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path / "certs")
    m = launch(tmp_path / "mesh", **tls_env(certs, ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20"))
    try:
        before = served_certificate(m.entry, certs)
        async with AsyncOrchestratorClient(m.entry, credentials=client_of(certs)) as client:
            stream = client.submit("keep streaming while the certificate changes " * 4, session="s", max_tokens=60)
            first = await anext(stream)
            make_certs(certs, "stream")  # re-issued by the same CA: a new key and serial
            rest = [chunk async for chunk in stream]
        assert first.text and rest[-1].completion.usage.completion_tokens == 60  # the open stream finished
        after = poll(lambda: (c := served_certificate(m.entry, certs)) != before and c, what="the new certificate")
        assert after == ssl.PEM_cert_to_DER_cert((certs / "stream.pem").read_text())
        async with AsyncOrchestratorClient(m.entry, credentials=client_of(certs)) as client:  # a new connection
            result = await client.complete("and now?", session="s", max_tokens=3, timeout=10)
        assert result.completion.usage.completion_tokens == 3
    finally:
        m.stop()


def test_the_command_line_tools_of_the_readme_work_over_tls(tls_mesh: Mesh, certs: Path) -> None:
    """README "Securing the mesh": orchestrator-client and grpcurl with the same flags, and operator status."""
    flags = ["--ca-file", f"{certs}/ca.pem", "--cert-file", f"{certs}/client.pem", "--key-file", f"{certs}/client.key"]
    done = subprocess.run(
        [str(BIN / "orchestrator-client"), "submit", "--target", tls_mesh.entry, *flags, "--max-tokens", "4", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "4 completion tokens" in done.stderr
    tls = ["-cacert", f"{certs}/ca.pem", "-cert", f"{certs}/client.pem", "-key", f"{certs}/client.key"]
    done = subprocess.run(
        [str(BIN / "grpcurl"), *tls, tls_mesh.entry, "list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "orchestrator.v1.StreamService" in done.stdout.split()
    env = clean_env(**tls_env(certs))
    addresses = [tls_mesh.address(name) for name in STAGES]
    done = orchestrator_cli("status", *addresses, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(name in done.stdout for name in STAGES)


def test_reflection_can_be_turned_off_and_health_stays(fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(ORCH_SERVER_REFLECTION="false")
    done = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", m.entry, "list"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0 and "reflection" in done.stderr.lower(), done.stderr
    with grpc.insecure_channel(m.entry) as channel:
        reply = HealthStub(channel).Check(HealthCheckRequest(), timeout=5)
    assert reply.status == HealthCheckResponse.SERVING


async def test_a_caller_renews_its_own_certificate_without_a_restart(tmp_path: Path) -> None:
    """A stage's certificate is also what it shows the stage it calls: renewed on disk, the next calls go over new
    connections that show it, calls under way finish on the old one."""
    certs = make_certs(tmp_path / "certs")
    m = launch(tmp_path / "mesh", **tls_env(certs, ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20"))
    try:
        async with AsyncOrchestratorClient(m.entry, credentials=client_of(certs)) as client:
            # ~200 words at 20 ms each: still streaming when the renewal is noticed (a second or more later).
            under_way = client.submit("a stream that outlives the renewal " * 40, session="s", max_tokens=150)
            await anext(under_way)
            await asyncio.to_thread(make_certs, certs, "post")  # the post stage's certificate, re-issued
            log = m.stages["post"].log_path
            assert log is not None

            async def renewed() -> bool:
                await client.complete("after the renewal", session="s2", max_tokens=2, timeout=10)
                return "TLS certificate renewed" in log.read_text()

            deadline = asyncio.get_running_loop().time() + 15
            while not await renewed():
                assert asyncio.get_running_loop().time() < deadline, "post kept its old connection"
                await asyncio.sleep(0.2)
            rest = [chunk async for chunk in under_way]
        assert rest[-1].completion.usage.completion_tokens == 150  # finished on the connection it started on
    finally:
        m.stop()
