"""Validation of incoming PromptRequests, the same at every stage."""

from __future__ import annotations

import math
import uuid

from orchestrator.core.config import LimitsConfig
from orchestrator.core.errors import InvalidRequest
from orchestrator.v1 import types_pb2

MAX_REQUEST_ID_CHARS = 128


class Undecodable:
    """What a request body that is not a PromptRequest decodes to: the runtime refuses it before anything reads it."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def decode_request(data: bytes) -> types_pb2.PromptRequest | Undecodable:
    """A stage RPC's request deserializer that never raises: gRPC would answer UNKNOWN with the exception's
    text (internals, and no stage) for a body that does not parse."""
    try:
        return types_pb2.PromptRequest.FromString(data)
    except Exception:  # DecodeError, and whatever else a hostile body can make a parser raise
        return Undecodable(len(data))


def normalize_request(request: types_pb2.PromptRequest | Undecodable, limits: LimitsConfig) -> types_pb2.PromptRequest:
    """Reject a bad request with a clear message; fill in the request id and default max_tokens.

    Mutates ``request`` so that every stage downstream sees the same id and limits, and returns it.
    """
    if isinstance(request, Undecodable):
        raise InvalidRequest(f"the request body ({request.size} bytes) is not a valid PromptRequest")
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(f"the request is {size} bytes; the limit is {limits.max_request_bytes}")
    _check_identity(request, limits)
    _check_input(request, limits)
    _check_params(request.params, limits)
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    if request.params.max_tokens == 0:
        request.params.max_tokens = limits.default_max_tokens
    return request


def _check_identity(request: types_pb2.PromptRequest, limits: LimitsConfig) -> None:
    session = request.session.id if request.HasField("session") else ""
    if not session.strip():
        raise InvalidRequest("session.id is required")
    if len(session) > limits.max_session_chars:
        raise InvalidRequest(f"session.id is {len(session)} characters; the limit is {limits.max_session_chars}")
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters")


def _check_input(request: types_pb2.PromptRequest, limits: LimitsConfig) -> None:
    if not request.input.strip():
        raise InvalidRequest("input is empty")
    if len(request.input) > limits.max_input_chars:
        raise InvalidRequest(f"input is {len(request.input)} characters; the limit is {limits.max_input_chars}")
    if len(request.meta) > limits.max_meta_entries:
        raise InvalidRequest(f"meta has {len(request.meta)} entries; the limit is {limits.max_meta_entries}")
    for key, value in request.meta.items():
        if len(key) > limits.max_meta_chars or len(value) > limits.max_meta_chars:
            raise InvalidRequest(f"meta[{key[:32]!r}] is longer than {limits.max_meta_chars} characters")


def _check_params(params: types_pb2.GenerationParams, limits: LimitsConfig) -> None:
    if params.max_tokens > limits.max_tokens_limit:
        raise InvalidRequest(f"params.max_tokens is {params.max_tokens}; the limit is {limits.max_tokens_limit}")
    if len(params.stop) > limits.max_stop_sequences:
        raise InvalidRequest(f"params.stop has {len(params.stop)} sequences; the limit is {limits.max_stop_sequences}")
    for i, stop in enumerate(params.stop):
        if not stop:
            raise InvalidRequest(f"params.stop[{i}] is empty")
        if len(stop) > limits.max_stop_chars:
            raise InvalidRequest(f"params.stop[{i}] is longer than {limits.max_stop_chars} characters")
    if not math.isfinite(params.temperature) or not 0.0 <= params.temperature <= 2.0:
        raise InvalidRequest(f"params.temperature must be within [0, 2], got {params.temperature}")
