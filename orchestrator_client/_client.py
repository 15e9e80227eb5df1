"""Async and sync clients of the StreamService edge."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace

from orchestrator.v1 import stages_pb2, stages_pb2_grpc, types_pb2
from orchestrator_client._errors import OrchestratorRpcError

SUBMIT_SERVICE = stages_pb2.DESCRIPTOR.services_by_name["StreamService"].full_name
SUBMIT_RPC = f"{SUBMIT_SERVICE}/Submit"


def tls_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """Credentials to reach a mesh over TLS: ``ca_file`` is the CA that signed the edge's certificate (None: the
    system's roots); ``cert_file`` and ``key_file`` are this client's own, for an edge that asks clients for one
    (mutual TLS)."""

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file), private_key=read(key_file), certificate_chain=read(cert_file)
    )


def _auth_metadata(
    target: str, credentials: grpc.ChannelCredentials | None, token: str | None
) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries (the API key); a key is never sent in clear off this machine."""
    if token is None:
        return ()
    if credentials is None and not _loopback(target):
        raise ValueError(f"refusing to send an API key to {target} without TLS: pass credentials=tls_credentials()")
    return (("authorization", f"Bearer {token}"),)


def _loopback(target: str) -> bool:
    host = target.rpartition(":")[0].strip("[]") if ":" in target else target
    return host in ("localhost", "::1") or host.startswith("127.")


def _open_channel(
    module: Any, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
) -> Any:
    if credentials is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, credentials, options=options)


def build_request(
    input: str,
    *,
    session: str,
    max_tokens: int = 0,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    meta: Mapping[str, str] | None = None,
    request_id: str = "",
) -> types_pb2.PromptRequest:
    """A PromptRequest; ``max_tokens=0`` takes the server's default."""
    return types_pb2.PromptRequest(
        request_id=request_id,
        session=types_pb2.SessionId(id=session),
        input=input,
        meta=dict(meta or {}),
        params=types_pb2.GenerationParams(max_tokens=max_tokens, stop=list(stop), temperature=temperature),
    )


@dataclass(frozen=True)
class CompletionResult:
    """A whole completion: the joined text and the final chunk's completion info."""

    request_id: str
    text: str
    chunks: int
    completion: types_pb2.Completion
    trace_id: str = ""


def _collect(chunks: list[types_pb2.StreamChunk]) -> CompletionResult:
    if not chunks or not chunks[-1].HasField("completion"):
        raise OrchestratorRpcError(grpc.StatusCode.INTERNAL, "stream ended without a final chunk")
    return CompletionResult(
        request_id=chunks[-1].request_id,
        text="".join(c.text for c in chunks),
        chunks=len(chunks),
        completion=chunks[-1].completion,
        trace_id=chunks[-1].trace_id,
    )


class _Tracing:
    """Optional CLIENT spans around calls, with W3C trace context sent as metadata."""

    def __init__(self, tracer_provider: Any | None) -> None:
        self._tracer = tracer_provider.get_tracer("orchestrator_client") if tracer_provider is not None else None

    def start(self, metadata: Sequence[tuple[str, str]]) -> tuple[Any, list[tuple[str, str]]]:
        if self._tracer is None:
            return None, list(metadata)
        span = self._tracer.start_span(
            SUBMIT_RPC,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SUBMIT_RPC.split("/", maxsplit=1)[0],
                "rpc.method": "Submit",
            },
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, [*metadata, *carrier.items()]

    @staticmethod
    def end(span: Any, code: grpc.StatusCode | None) -> None:
        if span is None:
            return
        if code is not None:
            span.set_attribute("rpc.grpc.status_code", code.name)
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            if code == grpc.StatusCode.CANCELLED:
                span.add_event("cancelled")
        span.end()


# A keepalive ping after 10 s without one, and 5 s for its answer: a mesh that went silent (a partition sends
# no reset) fails the client's streams in ~15 s instead of at its deadline. The mesh permits pings this often.
KEEPALIVE: tuple[tuple[str, Any], ...] = (("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000))


def channel_options(retries: int, options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Channel options: keepalive (``options`` may override it) and, with ``retries`` > 0, gRPC's own retry
    policy for sheds and unavailable stages.

    The mesh sheds before sending any message, which is exactly when gRPC may retry a stream
    transparently, and it honours the ``grpc-retry-pushback-ms`` hint the shedding stage sends.
    """
    given = {key for key, _ in options}
    out = [opt for opt in KEEPALIVE if opt[0] not in given] + list(options)
    if retries > 0:
        policy = {
            "methodConfig": [
                {
                    "name": [{"service": SUBMIT_SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": min(retries + 1, 5),  # gRPC caps attempts at 5
                        "initialBackoff": "0.05s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
                    },
                }
            ]
        }
        out += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(policy))]
    return out


class AsyncOrchestratorClient:
    """grpc.aio client of the mesh's edge (the Stream stage).

    ``retries`` (0-4) lets gRPC retry a request the mesh shed or could not route, before any chunk
    arrived, waiting as long as the shedding stage asked. Pass an OpenTelemetry ``tracer_provider``
    to wrap each call in a CLIENT span whose trace the mesh joins. ``credentials`` (see :func:`tls_credentials`)
    connect over TLS; ``token`` is an API key, sent as ``authorization: Bearer`` on every call.
    """

    def __init__(
        self,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        tracer_provider: Any | None = None,
        retries: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._auth = _auth_metadata(target, credentials, token)
        self._channel = _open_channel(grpc.aio, target, credentials, channel_options(retries, options))
        self._stub = stages_pb2_grpc.StreamServiceStub(self._channel)
        self._tracing = _Tracing(tracer_provider)

    async def __aenter__(self) -> AsyncOrchestratorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def submit_request(
        self,
        request: types_pb2.PromptRequest,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> AsyncGenerator[types_pb2.StreamChunk, None]:
        """Stream the chunks of one request. Closing the stream early (``aclose()``) cancels it in the mesh."""
        span, md = self._tracing.start((*self._auth, *metadata))
        call = self._stub.Submit(request, timeout=timeout, metadata=md or None)
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    code = None
                    return
                yield chunk
        except grpc.aio.AioRpcError as err:
            code = err.code()
            raise OrchestratorRpcError.from_call_error(err) from None
        finally:
            call.cancel()
            self._tracing.end(span, code)

    def submit(
        self, input: str, *, session: str, timeout: float | None = None, **params: Any
    ) -> AsyncGenerator[types_pb2.StreamChunk, None]:
        """Stream the answer to ``input``; ``params`` are those of :func:`build_request`."""
        return self.submit_request(build_request(input, session=session, **params), timeout=timeout)

    async def complete(
        self, input: str, *, session: str, timeout: float | None = None, **params: Any
    ) -> CompletionResult:
        """The whole answer at once."""
        return _collect([c async for c in self.submit(input, session=session, timeout=timeout, **params)])


class OrchestratorClient:
    """Blocking client of the mesh's edge, for scripts and notebooks."""

    def __init__(
        self,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        tracer_provider: Any | None = None,
        retries: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self._auth = _auth_metadata(target, credentials, token)
        self._channel = _open_channel(grpc, target, credentials, channel_options(retries, options))
        self._stub = stages_pb2_grpc.StreamServiceStub(self._channel)
        self._tracing = _Tracing(tracer_provider)

    def __enter__(self) -> OrchestratorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def submit_request(
        self,
        request: types_pb2.PromptRequest,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Iterator[types_pb2.StreamChunk]:
        span, md = self._tracing.start((*self._auth, *metadata))
        call = self._stub.Submit(request, timeout=timeout, metadata=md or None)
        code: grpc.StatusCode | None = grpc.StatusCode.CANCELLED
        try:
            yield from call
            code = None
        except grpc.RpcError as err:
            code = err.code()
            raise OrchestratorRpcError.from_call_error(err) from None
        finally:
            call.cancel()
            self._tracing.end(span, code)

    def submit(
        self, input: str, *, session: str, timeout: float | None = None, **params: Any
    ) -> Iterator[types_pb2.StreamChunk]:
        return self.submit_request(build_request(input, session=session, **params), timeout=timeout)

    def complete(self, input: str, *, session: str, timeout: float | None = None, **params: Any) -> CompletionResult:
        return _collect(list(self.submit(input, session=session, timeout=timeout, **params)))
