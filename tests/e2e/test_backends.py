"""Real model backends: llama.cpp's OpenAI-compatible server, a failing HTTP backend, a remote gRPC worker,
hot-swapping the worker, and the circuit breaker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.launcher import Mesh
from orchestrator.v1 import admin_pb2, admin_pb2_grpc
from orchestrator_client import FinishReason, OrchestratorRpcError
from tests.conftest import (
    ROOT,
    SECURITY,
    clean_env,
    free_port_config,
    http_ok,
    mesh_channel,
    mesh_client,
    poll,
    run_demo,
    stage_status,
    start_on_free_port,
    stop_process,
)

pytestmark = pytest.mark.mesh


# -- llama.cpp's server with a tiny random-weight model --------------------------------------------


class LlamaServer:
    def __init__(self, run_dir: Path) -> None:
        self.model = run_dir / "tiny.gguf"
        subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "tiny_gguf.py"), str(self.model)], check=True)
        self.log_path = run_dir / "llama.log"
        self.proc, self.port = start_on_free_port(
            lambda port: [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(self.model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "4096",
                "--interrupt_requests",
                "false",
            ],
            lambda port: http_ok(f"http://127.0.0.1:{port}/v1/models"),
            self.log_path,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make llama-deps` (make test does)")
    server = LlamaServer(tmp_path_factory.mktemp("llama"))
    yield server
    server.stop()


def openai_env(base_url: str, api: str = "chat", **extra: str) -> dict[str, str]:
    return {
        "ORCH_INFERENCE_WORKER_KIND": "openai",
        "ORCH_INFERENCE_WORKER_OPENAI_BASE_URL": base_url,
        "ORCH_INFERENCE_WORKER_OPENAI_API": api,
        "ORCH_INFERENCE_WORKER_OPENAI_MODEL": "tiny",
        **extra,
    }


@pytest.mark.llama
@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_llama_completion_streams_through_all_five_stages(
    llama: LlamaServer, fresh_mesh: Callable[..., Mesh], api: str
) -> None:
    m = fresh_mesh(**openai_env(llama.base_url, api))
    async with mesh_client(m.entry) as client:
        chunks = [c async for c in client.submit("Say something.", session="llama", max_tokens=24, timeout=60)]
    text = "".join(c.text for c in chunks)
    done = chunks[-1].completion
    assert text and text.isascii() and text.isprintable()
    assert done.finish_reason == FinishReason.Value("FINISH_REASON_LENGTH")
    assert done.usage.completion_tokens == 24
    assert done.model == "tiny"
    assert [t.stage for t in done.timings] == ["rag", "assemble", "inference", "post", "stream"]
    # Greedy decoding is deterministic: the same request gives the same text.
    async with mesh_client(m.entry) as client:
        again = await client.complete("Say something.", session="llama", max_tokens=24, timeout=60)
    assert again.text == text


@pytest.mark.llama
async def test_client_cancel_stops_generation_on_the_llama_server(
    llama: LlamaServer, fresh_mesh: Callable[..., Mesh]
) -> None:
    m = fresh_mesh(**openai_env(llama.base_url, "completions"))
    disconnects = llama.log().count("disconnected")
    async with mesh_client(m.entry) as client:
        stream = client.submit("Write a very long story.", session="long", max_tokens=3500, timeout=120)
        for _ in range(3):
            await anext(stream)
        cancelled_at = time.monotonic()
        await stream.aclose()
        # The server logs the disconnect and aborts the generation (it would take seconds to finish) ...
        await asyncio.to_thread(
            poll,
            lambda: llama.log().count("disconnected") > disconnects,
            10.0,
            0.02,
            "the llama server to see the disconnect",
        )
        stopped_s = time.monotonic() - cancelled_at
        # ... so it is free at once: it serves one request at a time, and the next one starts right away.
        started = time.monotonic()
        nxt = client.submit("Next!", session="long", max_tokens=2, timeout=60)
        await anext(nxt)
        first_token_s = time.monotonic() - started
        await nxt.aclose()
    print(
        f"\nllama server saw the disconnect {stopped_s * 1000:.0f} ms after the cancel; "
        f"next request's first token after {first_token_s * 1000:.0f} ms"
    )
    assert first_token_s < 1.0


async def test_backend_down_is_unavailable_quickly(fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(**openai_env("http://127.0.0.1:1/v1"))
    async with mesh_client(m.entry) as client:
        started = time.monotonic()
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("anyone?", session="s", max_tokens=3, timeout=30)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.stage == "inference"
    assert "unreachable" in info.value.message
    assert time.monotonic() - started < 2.0  # connection refused, two quick retries, no hang


# -- a scripted HTTP backend for the failure cases -------------------------------------------------


class Backend:
    """A stand-in OpenAI-compatible server: answers with ``mode`` (429, 500, 503 or ok)."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                backend.requests += 1
                if backend.mode == "429":
                    self._send(429, b'{"error": {"message": "too many requests"}}', {"Retry-After": "7"})
                elif backend.mode == "503":
                    self._send(503, b'{"error": {"message": "loading"}}', {})
                elif backend.mode == "500":
                    self._send(500, b'{"error": {"message": "the model crashed"}}', {})
                else:
                    events = [{"choices": [{"delta": {"content": w}, "finish_reason": None}]} for w in ("ok", "!")]
                    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
                    self._send(200, body.encode(), {"Content-Type": "text/event-stream"})

            def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend()
    yield b
    b.stop()


async def test_rate_limited_backend_is_resource_exhausted_with_its_retry_hint(
    backend: Backend, fresh_mesh: Callable[..., Mesh]
) -> None:
    backend.mode = "429"
    m = fresh_mesh(**openai_env(backend.base_url))
    async with mesh_client(m.entry) as client:
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("hello", session="s", max_tokens=3, timeout=30)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.stage == "inference"
    assert info.value.retry_after_s == 7.0  # the backend's Retry-After, passed through
    assert "too many requests" in info.value.message
    assert backend.requests == 1  # a 7 s wait is the caller's call, not a silent retry


def _health(address: str, service: str) -> int:
    with mesh_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)


async def test_circuit_breaker_opens_flips_readiness_and_a_probe_closes_it(
    backend: Backend, fresh_mesh: Callable[..., Mesh]
) -> None:
    backend.mode = "503"
    m = fresh_mesh(
        **openai_env(
            backend.base_url,
            ORCH_INFERENCE_WORKER_RETRIES="0",
            ORCH_INFERENCE_WORKER_BREAKER_FAILURES="3",
            ORCH_INFERENCE_WORKER_BREAKER_OPEN_S="1.5",
        )
    )
    inference = m.address("inference")
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(inference, "orchestrator.v1.InferenceService") == serving
    async with mesh_client(m.entry) as client:
        for _ in range(3):
            with pytest.raises(OrchestratorRpcError) as info:
                await client.complete("hello", session="s", max_tokens=3, timeout=30)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert backend.requests == 3
        poll(lambda: _health(inference, "orchestrator.v1.InferenceService") == not_serving, what="NOT_SERVING")
        assert _health(inference, "") == not_serving
        assert _health(inference, "orchestrator.liveness") == serving  # out of rotation, not restarted
        # Open: requests fail fast without reaching the backend.
        with pytest.raises(OrchestratorRpcError) as info:
            await client.complete("hello", session="s", max_tokens=3, timeout=30)
        assert "circuit breaker open" in info.value.message
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        assert backend.requests == 3
        # The backend recovers; after the open period one probe goes through and closes the breaker.
        backend.mode = "ok"
        await asyncio.sleep(1.6)
        result = await client.complete("hello", session="s", max_tokens=3, timeout=30)
        assert result.text == "ok!"
    poll(lambda: _health(inference, "orchestrator.v1.InferenceService") == serving, what="SERVING again")


# -- remote gRPC worker ----------------------------------------------------------------------------


@pytest.fixture
def worker_server(tmp_path: Path) -> Iterator[str]:
    ready = tmp_path / "worker.ready"
    env = clean_env(ORCH_INFERENCE_WORKER_ECHO_TOKEN_DELAY_MS="20", ORCH_INFERENCE_WORKER_NAME="echo-remote")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("orchestrator")),
            "worker-server",
            "--port",
            "0",
            "--ready-file",
            str(ready),
        ],
        env=env,
    )
    try:
        poll(lambda: ready.exists() or proc.poll() is not None, timeout_s=30, what="the worker server")
        assert proc.poll() is None
        yield json.loads(ready.read_text())["address"]
    finally:
        proc.terminate()
        proc.wait(10)


async def test_remote_worker_streams_and_cancels(worker_server: str, fresh_mesh: Callable[..., Mesh]) -> None:
    m = fresh_mesh(ORCH_INFERENCE_WORKER_KIND="remote", ORCH_INFERENCE_WORKER_REMOTE_ADDRESS=worker_server)
    async with mesh_client(m.entry) as client:
        result = await client.complete("What is BM25?", session="r", max_tokens=5, timeout=30)
        assert result.completion.usage.completion_tokens == 5
        assert result.text.startswith("Answer the question")
        stream = client.submit("long " * 300, session="r", max_tokens=300, timeout=60)
        await anext(stream)
        cancelled_at = time.time_ns()
        await stream.aclose()

    def stopped() -> admin_pb2.WorkerStatus | None:
        w = stage_status(worker_server, plaintext=True).worker
        return w if w.active == 0 and w.last_generation_end_unix_nanos > cancelled_at else None

    worker = poll(stopped, what="the remote worker to stop")
    stop_ms = (worker.last_generation_end_unix_nanos - cancelled_at) / 1e6
    print(f"\nremote worker stopped {stop_ms:.1f} ms after the client cancelled")
    assert stop_ms < 500
    assert worker.name == "echo-remote"


# -- hot-swap --------------------------------------------------------------------------------------


def write_config(path: Path, name: str) -> None:
    path.write_text(
        f'[inference.worker]\nkind = "echo"\nname = "{name}"\n[inference.worker.echo]\ntoken_delay_ms = 20.0\n'
    )


def reload(address: str) -> str:
    with mesh_channel(address) as channel:
        reply = admin_pb2_grpc.AdminServiceStub(channel).Reload(
            admin_pb2.ReloadRequest(), timeout=10, metadata=SECURITY.metadata()
        )
        return str(reply.worker)


async def test_hot_swap_keeps_in_flight_streams_on_the_old_worker(
    fresh_mesh: Callable[..., Mesh], tmp_path: Path
) -> None:
    config = tmp_path / "pipeline.toml"
    write_config(config, "echo-a")
    m = fresh_mesh(str(config))
    inference = m.address("inference")
    async with mesh_client(m.entry) as client:
        in_flight = [
            asyncio.create_task(client.complete("swap " * 100, session=f"s{i}", max_tokens=60, timeout=60))
            for i in range(3)
        ]
        await asyncio.to_thread(poll, lambda: stage_status(inference).worker.active == 3, what="3 generations")
        write_config(config, "echo-b")
        assert await asyncio.to_thread(reload, inference) == "echo-b"
        new = await client.complete("after the swap", session="n", max_tokens=5, timeout=30)
        assert new.completion.model == "echo-b"
        old = await asyncio.gather(*in_flight)
        assert [r.completion.model for r in old] == ["echo-a"] * 3
        assert all(r.completion.usage.completion_tokens == 60 for r in old)  # nothing dropped
        # SIGHUP reloads too.
        write_config(config, "echo-c")
        m.stages["inference"].popen.send_signal(signal.SIGHUP)

        async def model() -> str:
            return (await client.complete("hup", session="h", max_tokens=1, timeout=30)).completion.model

        deadline = time.monotonic() + 10
        while await model() != "echo-c":
            assert time.monotonic() < deadline, "SIGHUP did not swap the worker"
            await asyncio.sleep(0.05)
    assert stage_status(inference).worker.name == "echo-c"


def test_reload_with_a_bad_config_keeps_the_worker(fresh_mesh: Callable[..., Mesh], tmp_path: Path) -> None:
    config = tmp_path / "pipeline.toml"
    write_config(config, "echo-a")
    m = fresh_mesh(str(config))
    config.write_text('[inference.worker]\nkind = "gpt"\n')
    with pytest.raises(grpc.RpcError) as info:
        reload(m.address("inference"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'gpt' is not one of" in info.value.details()
    assert stage_status(m.address("inference")).worker.name == "echo-a"
    with pytest.raises(grpc.RpcError) as info:
        reload(m.address("post"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.llama
def test_demo_runs_against_llama_by_config_alone(llama: LlamaServer, tmp_path: Path) -> None:
    done = run_demo(free_port_config(tmp_path), clean_env(**openai_env(llama.base_url, "completions")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary: 10 completed, 0 shed, 0 failed (of 10)" in done.stdout
    assert done.stdout.count("by tiny;") == 10
