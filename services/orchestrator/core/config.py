"""Typed mesh configuration: one TOML file, every field overridable by an ``ORCH_*`` environment variable."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import string
import tomllib
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.core.graph import STAGES

ENV_PREFIX = "ORCH"
CONFIG_ENV = "ORCH_CONFIG"
# Read by the clients (orchestrator-client, orchestrator status), not by the stages: a shell that sets them for a
# client may start a stage too.
CLIENT_ENV = frozenset({"ORCH_TARGET", "ORCH_TOKEN"})
DEFAULT_PROMPT_TEMPLATE = "Answer the question from the context.\nContext:\n{context}\nQuestion: {input}\nAnswer:"
RAG_MODES = ("bm25", "dense", "hybrid")
# What the prompt template gets as its context when no document fits.
NO_CONTEXT = "(none)"
# What a stage link adds around one request in a call frame (ids, deadline, trace context), with room to spare.
LINK_FRAME_OVERHEAD_BYTES = 4096


def _f(default: Any, help: str) -> Any:
    """A config field with its documentation (shown by ``orchestrator config``)."""
    return field(default=default, metadata={"help": help})


# The settings every stage has, each overridden per stage with its own default.
def _port(default: int) -> Any:
    return _f(default, "port the stage binds (0 picks a free one)")


def _metrics_port(default: int) -> Any:
    return _f(default, "Prometheus /metrics port (0 picks a free one, -1 turns it off)")


def _queue_capacity(default: int) -> Any:
    return _f(default, "requests that may wait for a slot; one more is shed")


def _adaptive_limit(default: bool) -> Any:
    return _f(default, "the concurrency limit follows the queueing measured below (at most concurrency)")


def _env_name(path: tuple[str, ...]) -> str:
    """The environment variable that overrides the setting at ``path``."""
    return "_".join((ENV_PREFIX, *path)).upper()


@dataclass(frozen=True)
class StageConfig:
    """Settings every stage has."""

    host: str = _f("127.0.0.1", "interface the stage binds")
    port: int = _port(0)
    replicas: int = _f(1, "processes of this stage `orchestrator up` starts, each on a free port")
    endpoints: tuple[str, ...] = _f(
        (), "where callers reach the replicas: host:port of each, or dns:NAME:PORT for all a name resolves to"
    )
    queue_capacity: int = _queue_capacity(512)
    concurrency: int = _f(64, "requests processed at once")
    metrics_port: int = _metrics_port(-1)
    max_queue_wait_ms: float = _f(1000.0, "longest a request waits for a slot; one that would wait longer is shed")
    adaptive_limit: bool = _adaptive_limit(False)
    health_port: int = _f(
        -1, "also serve grpc.health.v1 alone, in plaintext, here: for probes that cannot do TLS (-1: off)"
    )
    max_connections: int = _f(0, "connections the stage accepts at once; one more is refused (0: no bound)")
    admin_port: int = _f(
        -1, "serve AdminService on server.admin_host at this port instead of the stage's port (-1: the stage's port)"
    )

    def addresses(self) -> tuple[str, ...]:
        """Where callers reach this stage."""
        if self.endpoints:
            return self.endpoints
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return (f"{host}:{self.port}",)

    def problems(self, name: str) -> list[str]:
        out = []
        if not 0 <= self.port <= 65535:
            out.append(f"{name}.port must be in 0..65535, got {self.port}")
        if self.queue_capacity < 0:
            out.append(f"{name}.queue_capacity must be >= 0, got {self.queue_capacity}")
        if self.concurrency < 1:
            out.append(f"{name}.concurrency must be >= 1, got {self.concurrency}")
        if self.max_queue_wait_ms <= 0:
            out.append(f"{name}.max_queue_wait_ms must be > 0")
        if not -1 <= self.metrics_port <= 65535:
            out.append(f"{name}.metrics_port must be in -1..65535, got {self.metrics_port}")
        if not -1 <= self.health_port <= 65535:
            out.append(f"{name}.health_port must be in -1..65535, got {self.health_port}")
        if not -1 <= self.admin_port <= 65535:
            out.append(f"{name}.admin_port must be in -1..65535, got {self.admin_port}")
        if self.max_connections < 0:
            out.append(f"{name}.max_connections must be >= 0")
        if self.replicas < 1:
            out.append(f"{name}.replicas must be >= 1")
        for endpoint in self.endpoints:
            host, sep, port = endpoint.removeprefix("dns:").rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                out.append(f"{name}.endpoints entry {endpoint!r} is not host:port or dns:NAME:PORT")
        return out


@dataclass(frozen=True)
class RagConfig(StageConfig):
    port: int = _port(50051)
    metrics_port: int = _metrics_port(9101)
    queue_capacity: int = _queue_capacity(512)
    concurrency: int = _f(32, "requests processed at once")
    top_k: int = _f(3, "documents retrieved per request")
    mode: str = _f("hybrid", "bm25, dense or hybrid (BM25 and vector search fused by reciprocal rank)")
    index: str = _f("", "index directory built by `orchestrator index build`; empty: documents embedded at start")
    index_check_s: float = _f(10.0, "seconds between checks for a new index generation (0: on SIGHUP/Reload only)")
    documents: str = _f("", "JSON Lines corpus (id, title, text) when there is no index; empty: the bundled one")
    candidates: int = _f(50, "documents each retriever proposes to the fusion (hybrid)")
    embedding_model: str = _f("", "ONNX sentence encoder; empty: the bundled all-MiniLM-L6-v2 (int8)")
    embedding_tokenizer: str = _f("", "tokenizer.json of embedding_model (set both or neither)")
    embedding_threads: int = _f(1, "threads one query embedding may use")
    embedding_batch: int = _f(32, "queries of concurrent requests embedded together, at most (1: one at a time)")
    simulated_delay_ms: float = _f(0.0, "extra delay per retrieval, for benchmarks")

    def problems(self, name: str) -> list[str]:
        out = super().problems(name)
        if self.top_k < 0:
            out.append(f"{name}.top_k must be >= 0, got {self.top_k}")
        if self.mode not in RAG_MODES:
            out.append(f"{name}.mode must be one of {', '.join(RAG_MODES)}, got {self.mode!r}")
        if self.index_check_s < 0:
            out.append(f"{name}.index_check_s must be >= 0")
        if min(self.candidates, self.embedding_threads, self.embedding_batch) < 1:
            out.append(f"{name}.candidates, {name}.embedding_threads and {name}.embedding_batch must be >= 1")
        if self.simulated_delay_ms < 0:
            out.append(f"{name}.simulated_delay_ms must be >= 0")
        if self.documents and not Path(self.documents).is_file():
            out.append(f"{name}.documents: no such file {self.documents!r}")
        if self.index and self.documents:
            out.append(f"{name}.index and {name}.documents: set one (an index holds its documents)")
        if self.index and not Path(self.index).is_dir():
            out.append(f"{name}.index: no such directory {self.index!r} (build one with `orchestrator index build`)")
        if bool(self.embedding_model) != bool(self.embedding_tokenizer):
            out.append(f"{name}.embedding_model and {name}.embedding_tokenizer: set both or neither")
        for what in ("embedding_model", "embedding_tokenizer"):
            path = getattr(self, what)
            if path and not Path(path).is_file():
                out.append(f"{name}.{what}: no such file {path!r}")
        return out


@dataclass(frozen=True)
class AssembleConfig(StageConfig):
    port: int = _port(50052)
    metrics_port: int = _metrics_port(9102)
    queue_capacity: int = _queue_capacity(512)
    concurrency: int = _f(64, "requests processed at once")
    max_prompt_chars: int = _f(20000, "longest prompt; context documents are dropped to fit")
    prompt_template: str = _f(
        DEFAULT_PROMPT_TEMPLATE, "the prompt, with {context} and {input} (literal braces doubled)"
    )

    def problems(self, name: str) -> list[str]:
        out = super().problems(name)
        if self.max_prompt_chars < 1:
            out.append(f"{name}.max_prompt_chars must be >= 1")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None}
        except ValueError as exc:
            out.append(f"{name}.prompt_template is not a valid template: {exc}")
        else:
            if fields != {"context", "input"}:
                out.append(f"{name}.prompt_template must use {{context}} and {{input}} and no other field")
        return out

    def template_chars(self) -> int:
        """Characters the template adds to an input when no document fits."""
        return len(self.prompt_template.format(context=NO_CONTEXT, input=""))


@dataclass(frozen=True)
class EchoConfig:
    """The deterministic echo worker: streams the prompt back word by word."""

    ttft_ms: float = _f(0.0, "delay before the first token")
    token_delay_ms: float = _f(0.0, "delay before each further token")
    gate_file: str = _f("", "if set, generation waits until this file exists (tests, demos)")
    fail_every: int = _f(0, "every Nth generation fails before its first token (benchmarks, demos; 0: never)")


@dataclass(frozen=True)
class OpenAIConfig:
    """Any OpenAI-compatible server: vLLM, llama.cpp's server, TGI's messages API, Ollama, OpenAI."""

    base_url: str = _f("http://127.0.0.1:8000/v1", "the API root, ending in /v1")
    model: str = _f("", "model name sent to the server (and reported as the model)")
    api: str = _f("chat", "chat (/chat/completions) or completions (/completions)")
    api_key_env: str = _f("OPENAI_API_KEY", "environment variable holding the API key (never logged)")
    api_key_file: str = _f("", "file holding the API key; wins over api_key_env")
    timeout_s: float = _f(60.0, "longest wait for the next bytes from the server")
    connect_timeout_s: float = _f(5.0, "longest wait to connect")


@dataclass(frozen=True)
class RemoteConfig:
    """A model served over this project's ModelWorkerService protocol (orchestrator worker-server)."""

    address: str = _f("127.0.0.1:50060", "host:port of the worker server")


@dataclass(frozen=True)
class WorkerConfig:
    kind: str = _f("echo", "model worker: echo, openai or remote")
    name: str = _f("", "model name to report (default: the worker's own)")
    retries: int = _f(2, "retries of a failed generation, only before its first token")
    retry_backoff_ms: float = _f(100.0, "first retry delay; doubles each time (Retry-After wins)")
    breaker_failures: int = _f(5, "consecutive failures that open the circuit breaker (0: never)")
    breaker_open_s: float = _f(10.0, "how long the breaker stays open before one probe is let through")
    echo: EchoConfig = field(default_factory=EchoConfig)
    openai: OpenAIConfig = field(default_factory=OpenAIConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)


@dataclass(frozen=True)
class InferenceConfig(StageConfig):
    port: int = _port(50053)
    metrics_port: int = _metrics_port(9103)
    queue_capacity: int = _queue_capacity(1024)
    concurrency: int = _f(64, "generations at once: the model worker's concurrency limit")
    coalesce_tokens: int = _f(8, "send a message once this many tokens wait (1: never wait for more)")
    coalesce_ms: float = _f(5.0, "or once the oldest waiting token is this old")
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    def problems(self, name: str) -> list[str]:
        out = super().problems(name)
        if self.coalesce_tokens < 1:
            out.append(f"{name}.coalesce_tokens must be >= 1")
        if self.coalesce_ms < 0:
            out.append(f"{name}.coalesce_ms must be >= 0")
        w = self.worker
        if w.kind not in WORKER_KINDS:
            out.append(f"{name}.worker.kind {w.kind!r} is not one of {', '.join(WORKER_KINDS)}")
        if w.retries < 0 or w.breaker_failures < 0 or w.retry_backoff_ms < 0 or w.breaker_open_s <= 0:
            out.append(f"{name}.worker: retries, retry_backoff_ms, breaker_failures must be >= 0, breaker_open_s > 0")
        if w.openai.api not in ("chat", "completions"):
            out.append(f"{name}.worker.openai.api {w.openai.api!r} is not chat or completions")
        if w.kind == "openai" and not w.openai.base_url.startswith(("http://", "https://")):
            out.append(f"{name}.worker.openai.base_url must start with http:// or https://")
        if w.openai.api_key_file and not Path(w.openai.api_key_file).is_file():
            out.append(f"{name}.worker.openai.api_key_file: no such file {w.openai.api_key_file!r}")
        if w.openai.timeout_s <= 0 or w.openai.connect_timeout_s <= 0:
            out.append(f"{name}.worker.openai timeouts must be > 0")
        return out


@dataclass(frozen=True)
class PostConfig(StageConfig):
    port: int = _port(50054)
    metrics_port: int = _metrics_port(9104)
    queue_capacity: int = _queue_capacity(512)
    concurrency: int = _f(1024, "streams relayed at once")


@dataclass(frozen=True)
class StreamConfig(StageConfig):
    port: int = _port(50055)
    metrics_port: int = _metrics_port(9105)
    queue_capacity: int = _queue_capacity(256)
    concurrency: int = _f(1024, "client streams served at most at once")
    adaptive_limit: bool = _adaptive_limit(True)
    log_sink: bool = _f(False, "also log each completion as 'session: text' (user data: off by default)")
    max_connections: int = _f(1500, "client connections at once (~20 KiB each); one more is refused (0: no bound)")
    max_connection_idle_s: float = _f(300.0, "a client connection with no call this long is closed (0: never)")
    max_connection_age_s: float = _f(
        0.0, "a client connection this old is asked to reconnect, e.g. to rebalance replicas (0: never)"
    )
    max_streams_per_connection: int = _f(4096, "streams one client connection may have open at once")

    def problems(self, name: str) -> list[str]:
        out = super().problems(name)
        if self.max_connection_idle_s < 0 or self.max_connection_age_s < 0:
            out.append(f"{name}.max_connection_idle_s and max_connection_age_s must be >= 0")
        if self.max_streams_per_connection < 1:
            out.append(f"{name}.max_streams_per_connection must be >= 1")
        return out


@dataclass(frozen=True)
class LimitsConfig:
    """Request validation, applied by every stage."""

    max_input_chars: int = _f(16384, "longest input accepted")
    default_max_tokens: int = _f(256, "max_tokens when a request leaves it 0")
    max_tokens_limit: int = _f(4096, "largest max_tokens accepted")
    max_stop_sequences: int = _f(4, "stop sequences per request")
    max_stop_chars: int = _f(64, "length of one stop sequence")
    max_session_chars: int = _f(256, "length of a session id")
    max_meta_entries: int = _f(32, "metadata entries per request")
    max_meta_chars: int = _f(1024, "length of one metadata key or value")
    max_request_bytes: int = _f(262144, "largest request accepted, serialized (input, meta and params together)")


@dataclass(frozen=True)
class ServerConfig:
    drain_grace_s: float = _f(10.0, "on SIGTERM, how long in-flight streams may finish")
    log_level: str = _f("INFO", "DEBUG, INFO, WARNING or ERROR")
    trace_text: bool = _f(False, "put the input text on the stream stage's span (user data: off by default)")
    uvloop: bool = _f(True, "run each process's event loop on uvloop (false: asyncio's own loop)")
    stage_links: bool = _f(
        True, "call the next stage over one multiplexed stream per replica (false: one gRPC call per request)"
    )
    gc_full_every: int = _f(
        1000, "young garbage collections between two full ones (CPython's default: 10); see ARCHITECTURE.md"
    )
    max_message_bytes: int = _f(
        4 * 1024 * 1024, "largest gRPC message a process sends or accepts, on every hop and link (gRPC's default)"
    )
    max_pending_calls: int = _f(
        8192, "calls gRPC holds for a stage before its code picks them up; a burst up to this size is answered in full"
    )
    reflection: bool = _f(True, "serve gRPC server reflection (v1 and v1alpha) on every stage")
    access_log: str = _f(
        "text", "a line per request at the edge (ids, status, sizes, timings; never text): text, json or off"
    )
    layout: tuple[str, ...] = _f(
        (),
        "stages that share a process, a group per entry with stages joined by + (e.g. rag+assemble,inference,"
        "post+stream); inside a group calls are in memory; empty: a process per stage",
    )
    admin_host: str = _f("127.0.0.1", "interface of the stages' admin listeners (<stage>.admin_port)")


@dataclass(frozen=True)
class NetworkConfig:
    """How processes notice a peer that went silent (no reset, no answer), and how fast they move on."""

    keepalive_time_s: float = _f(
        1.5, "every connection (stage to stage, stage to client) is pinged this often (>= 1: gRPC's most)"
    )
    keepalive_timeout_s: float = _f(
        1.5, "a ping unanswered this long ends the connection: its calls fail over or are cancelled"
    )
    connect_timeout_s: float = _f(2.0, "longest wait to connect to a replica")
    reconnect_backoff_s: float = _f(0.1, "first wait before reconnecting to a replica; doubles up to the maximum")
    max_reconnect_backoff_s: float = _f(2.0, "longest wait between two attempts to reconnect")
    health_interval_s: float = _f(0.5, "how often a stage checks each replica of the next stage (when it has several)")
    health_timeout_s: float = _f(
        1.0, "a replica that misses this or answers NOT_SERVING takes no new calls until it answers SERVING"
    )
    resolve_interval_s: float = _f(
        5.0, "how often a stage looks up again the replicas its callee's dns: endpoints name (and soon after a failure)"
    )

    def problems(self) -> list[str]:
        out = [f"network.{f.name} must be > 0" for f in dataclasses.fields(self) if getattr(self, f.name) <= 0]
        if self.keepalive_time_s < 1.0:
            out.append("network.keepalive_time_s must be >= 1 (gRPC sends at most one ping a second)")
        if self.max_reconnect_backoff_s < self.reconnect_backoff_s:
            out.append("network.max_reconnect_backoff_s must be >= network.reconnect_backoff_s")
        return out


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass(frozen=True)
class TlsConfig:
    """Transport security on every hop. Off by default: plaintext, which is allowed on loopback only.

    ``{stage}`` in a file name is replaced by the stage's name, so one config serves every stage."""

    cert_file: str = _f(
        "", "this stage's certificate chain (PEM), served to its callers and shown to its callee; empty: plaintext"
    )
    key_file: str = _f("", "the certificate's private key (PEM)")
    ca_file: str = _f(
        "",
        "CA that signs the stages' certificates: a caller checks its callee with it, and every stage but the "
        "edge accepts only callers holding a certificate it signed (mutual TLS)",
    )
    client_ca_file: str = _f("", "CA that signs the edge's clients' certificates; if set, a client must show one")
    check_names: bool = _f(
        True, "a callee's certificate must name its stage (DNS SAN), and a caller's must name the calling stage"
    )
    allow_insecure: bool = _f(False, "serve plaintext on an interface that is not loopback (trusted networks only)")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def files(self, stage: str) -> tuple[str, str]:
        """This stage's certificate and key file."""
        return self.cert_file.replace("{stage}", stage), self.key_file.replace("{stage}", stage)

    def problems(self, hosts: Mapping[str, str]) -> list[str]:
        """``hosts``: each setting that names an interface to bind, and its value."""
        out = []
        if bool(self.cert_file) != bool(self.key_file):
            out.append("tls.cert_file and tls.key_file must be set together")
        if self.cert_file and not self.ca_file:
            out.append("tls.ca_file must be set with tls.cert_file: stages check each other with it")
        if self.client_ca_file and not self.cert_file:
            out.append("tls.client_ca_file needs tls.cert_file (mutual TLS is TLS)")
        for name in ("ca_file", "client_ca_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                out.append(f"tls.{name}: no such file {path!r}")
        if not self.enabled and not self.allow_insecure:
            for setting, host in hosts.items():
                if not is_loopback(host):
                    out.append(
                        f"{setting} {host!r} is not loopback and TLS is off: set tls.cert_file, tls.key_file "
                        "and tls.ca_file, or tls.allow_insecure = true on a network you trust"
                    )
        return out


@dataclass(frozen=True)
class AuthConfig:
    """Who may call. With ``keys_file``, the edge serves only requests carrying a known API key
    (``authorization: Bearer <key>``), each key naming a tenant, and every stage's AdminService only admin keys.
    Without it, anyone who reaches the edge may call it, and AdminService answers callers on this machine only."""

    keys_file: str = _f(
        "", "API keys: JSON Lines of tenant, sha256 of the key, role (client or admin) and limits; re-read on change"
    )

    def problems(self) -> list[str]:
        if self.keys_file and not Path(self.keys_file).is_file():
            return [f"auth.keys_file: no such file {self.keys_file!r}"]
        return []


@dataclass(frozen=True)
class TenantsConfig:
    """Each tenant's share of the edge, unless its key sets its own (0: no limit)."""

    rate: float = _f(0.0, "requests a second a tenant may start (a token bucket; 0: no limit)")
    burst: int = _f(0, "requests a tenant may start at once above its rate (0: one second's worth)")
    max_streams: int = _f(0, "streams a tenant may have open at once (0: no limit)")
    max_tracked: int = _f(1000, "tenants tracked at once; the idlest is forgotten when more arrive")

    def problems(self) -> list[str]:
        out = [f"tenants.{f.name} must be >= 0" for f in dataclasses.fields(self) if getattr(self, f.name) < 0]
        if self.max_tracked < 1:
            out.append("tenants.max_tracked must be >= 1")
        return out


DLQ_STORES = ("sqlite", "nats", "off")


@dataclass(frozen=True)
class DlqConfig:
    """Dead letters: requests that failed after the edge admitted them, kept to be listed and replayed."""

    store: str = _f("sqlite", "sqlite (one file on the edge's host), nats (JetStream, shared by edges) or off")
    path: str = _f("", "the SQLite file (default: $XDG_STATE_HOME/prompt-orchestrator/dead-letters.db)")
    keep_request: bool = _f(False, "keep each request (input, params, metadata: user data) so it can be replayed")
    sheds: bool = _f(False, "also keep requests shed further down after the edge admitted them")
    max_letters: int = _f(10000, "letters kept at most; the oldest go first (and are counted)")
    max_age_s: float = _f(7 * 24 * 3600.0, "letters older than this go")
    queue: int = _f(1000, "letters waiting to be written; past this, new ones are dropped (and counted)")
    nats_url: str = _f("nats://127.0.0.1:4222", "the NATS server, for store = nats")
    nats_stream: str = _f("ORCH_DLQ", "the JetStream stream, for store = nats")

    def problems(self) -> list[str]:
        out = []
        if self.store not in DLQ_STORES:
            out.append(f"dlq.store {self.store!r} is not one of {', '.join(DLQ_STORES)}")
        if self.max_letters < 1 or self.max_age_s <= 0 or self.queue < 1:
            out.append("dlq.max_letters and dlq.queue must be >= 1, dlq.max_age_s > 0")
        return out


@dataclass(frozen=True)
class MeshConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    tenants: TenantsConfig = field(default_factory=TenantsConfig)
    dlq: DlqConfig = field(default_factory=DlqConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    assemble: AssembleConfig = field(default_factory=AssembleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    post: PostConfig = field(default_factory=PostConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def stage(self, name: str) -> StageConfig:
        cfg = getattr(self, name)
        assert isinstance(cfg, StageConfig)
        return cfg

    def problems(self) -> list[str]:
        out = [p for name in STAGES for p in self.stage(name).problems(name)]
        out += self._server_problems() + self._limits_problems() + self.network.problems()
        hosts = {f"{name}.host": self.stage(name).host for name in STAGES}
        if any(self.stage(name).admin_port >= 0 for name in STAGES):
            hosts["server.admin_host"] = self.server.admin_host
        out += self.tls.problems(hosts)
        out += self.auth.problems() + self.tenants.problems() + self.dlq.problems()
        return out

    def groups(self) -> list[tuple[str, ...]]:
        """The processes of the mesh: each a tuple of the stages it serves, in data-flow order (callee first)."""
        if not self.server.layout:
            return [(name,) for name in STAGES]
        groups = [tuple(sorted(g.split("+"), key=STAGES.index)) for g in self.server.layout]
        return sorted(groups, key=lambda g: STAGES.index(g[0]))

    def _layout_problems(self) -> list[str]:
        if not self.server.layout:
            return []
        groups = [tuple(g.split("+")) for g in self.server.layout]
        named = [s for g in groups for s in g]
        out = [f"server.layout: unknown stage {s!r}" for s in named if s not in STAGES]
        if out:
            return out
        if sorted(named) != sorted(STAGES):
            out.append(f"server.layout must name every stage exactly once ({', '.join(STAGES)})")
        for group in groups:
            where = sorted(STAGES.index(s) for s in group)
            if where != list(range(where[0], where[0] + len(where))):
                out.append(
                    f"server.layout group {'+'.join(group)!r}: stages in a process must be adjacent in the chain"
                )
            if len({self.stage(s).replicas for s in group}) > 1:
                out.append(
                    f"server.layout group {'+'.join(group)!r}: stages that share a process have as many replicas"
                )
        return out

    def _server_problems(self) -> list[str]:
        out = self._layout_problems()
        if self.server.drain_grace_s < 0:
            out.append("server.drain_grace_s must be >= 0")
        if self.server.gc_full_every < 1:
            out.append("server.gc_full_every must be >= 1")
        if self.server.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            out.append(f"server.log_level {self.server.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        if self.server.max_message_bytes < 65536:
            out.append("server.max_message_bytes must be >= 65536")
        if self.server.max_pending_calls < 1:
            out.append("server.max_pending_calls must be >= 1")
        if self.server.access_log not in ("text", "json", "off"):
            out.append(f"server.access_log {self.server.access_log!r} is not text, json or off")
        return out

    def _limits_problems(self) -> list[str]:
        """Limits that agree: a request the edge accepts is never refused for its size further down."""
        out = []
        lim = self.limits
        for f in dataclasses.fields(lim):
            if getattr(lim, f.name) < 0:
                out.append(f"limits.{f.name} must be >= 0")
        if lim.default_max_tokens > lim.max_tokens_limit:
            out.append("limits.default_max_tokens must be <= limits.max_tokens_limit")
        if lim.max_request_bytes + LINK_FRAME_OVERHEAD_BYTES > self.server.max_message_bytes:
            out.append(
                f"limits.max_request_bytes ({lim.max_request_bytes}) must leave {LINK_FRAME_OVERHEAD_BYTES} bytes "
                f"of server.max_message_bytes ({self.server.max_message_bytes}) for a stage link's framing"
            )
        if not out and lim.max_input_chars + self.assemble.template_chars() > self.assemble.max_prompt_chars:
            out.append(
                f"assemble.max_prompt_chars ({self.assemble.max_prompt_chars}) must fit the longest input "
                f"(limits.max_input_chars, {lim.max_input_chars}) in the prompt template "
                f"({self.assemble.template_chars()} characters of its own)"
            )
        return out


WORKER_KINDS = ("echo", "openai", "remote")


class ConfigError(Exception):
    """Every problem found in a config file and its overrides, reported at once."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


T = TypeVar("T")


@dataclass(frozen=True)
class Setting:
    """One leaf of the config tree, for docs and env overrides."""

    path: tuple[str, ...]
    type: Any
    default: Any
    help: str

    @property
    def env(self) -> str:
        return _env_name(self.path)

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def settings(cls: type = MeshConfig, prefix: tuple[str, ...] = ()) -> Iterator[Setting]:
    """Every leaf setting of ``cls`` in declaration order."""
    hints = _hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp):
            yield from settings(tp, (*prefix, f.name))
        else:
            yield Setting((*prefix, f.name), tp, getattr(default, f.name), f.metadata.get("help", ""))


def _to_tuple(value: Any) -> tuple[str, ...] | None:
    items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        return None
    return tuple(items)


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    return None


def _to_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    return None


def _to_float(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return None


def _to_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# Each field type: how a TOML value or an environment string becomes it (None: it cannot), and what it wanted.
_COERCE: dict[Any, tuple[Callable[[Any], Any], str]] = {
    tuple: (_to_tuple, "a list of strings"),
    bool: (_to_bool, "true or false"),
    int: (_to_int, "an integer"),
    float: (_to_float, "a number"),
    str: (_to_str, "a string"),
}


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check a TOML value (or parse an env string) against the field's type."""
    convert, wanted = _COERCE[typing.get_origin(tp) or tp]
    out = convert(value)
    if out is None:
        problems.append(f"{where}: expected {wanted}, got {value!r}")
    return out


def _build(
    cls: type[T],
    data: Mapping[str, Any],
    env: Mapping[str, str],
    path: tuple[str, ...],
    source: str,
    problems: list[str],
) -> T:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{source}: unknown key {'.'.join((*path, key))!r}{hint}")
    kwargs: dict[str, Any] = {}
    for name in names:
        tp = hints[name]
        sub_path = (*path, name)
        if _is_config(tp):
            sub = data.get(name, {})
            if not isinstance(sub, dict):
                problems.append(f"{source}: {'.'.join(sub_path)} must be a table")
                sub = {}
            kwargs[name] = _build(tp, sub, env, sub_path, source, problems)
            continue
        env_name = _env_name(sub_path)
        if env_name in env:
            value = _coerce(env[env_name], tp, env_name, problems)
        elif name in data:
            value = _coerce(data[name], tp, f"{source}: {'.'.join(sub_path)}", problems)
        else:
            continue
        if value is not None:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> MeshConfig:
    """Load the config once, at the edge of a process: file (if any), then ``ORCH_*`` overrides.

    ``path`` defaults to ``$ORCH_CONFIG``; with neither, built-in defaults apply.
    Raises ConfigError listing every problem.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    source = "environment"
    problems: list[str] = []
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{path}: no such file"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    known = {s.env for s in settings()} | {CONFIG_ENV} | CLIENT_ENV
    for name, value in env.items():
        if name.endswith("_REPLICAS") and name in known and ":" in value:
            problems.append(f"{name} is a count of processes; list where callers reach them in {name[:-9]}_ENDPOINTS")
    for name in env:
        if name.startswith(ENV_PREFIX + "_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"environment: unknown variable {name}{hint}")
    cfg = _build(MeshConfig, data, env, (), source, problems)
    problems.extend(cfg.problems())
    if problems:
        raise ConfigError(problems)
    return cfg


def describe_settings() -> str:
    """A Markdown table of every setting: TOML key, environment variable, default, meaning."""
    rows = ["| key | environment variable | default | meaning |", "|---|---|---|---|"]
    for s in settings():
        default = ",".join(s.default) if isinstance(s.default, tuple) else s.default
        default = str(default).lower() if isinstance(default, bool) else default
        rows.append(f"| `{s.key}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)
