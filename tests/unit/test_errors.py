"""The one error mapping: every error becomes the right status and comes back intact."""

from __future__ import annotations

import grpc
import pytest

from orchestrator.core import errors


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Overloaded("full", stage="post", retry_after_s=0.25), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ChannelClosed("gone", stage="rag"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.InferenceError("model failed"), grpc.StatusCode.INTERNAL),
        (errors.OtherError("other"), grpc.StatusCode.INTERNAL),
    ],
)
def test_round_trip(error: errors.OrchestratorError, code: grpc.StatusCode) -> None:
    status = errors.to_status(error)
    assert status.code == code
    assert status.details == error.message
    decoded = errors.decode_status(status.code, status.details, status.trailing_metadata)
    assert decoded.reason == error.reason
    assert decoded.stage == error.stage
    assert decoded.retry_after_s == error.retry_after_s


def test_overloaded_carries_plain_trailers_too() -> None:
    status = errors.to_status(
        errors.Overloaded("full", stage="inference", retry_after_s=0.12, metadata={"capacity": "4"})
    )
    trailers = dict(status.trailing_metadata)
    assert trailers["orchestrator-stage"] == "inference"
    assert trailers["grpc-retry-pushback-ms"] == "120"
    decoded = errors.decode_status(status.code, status.details, status.trailing_metadata)
    assert decoded.metadata == {"capacity": "4"}


def test_plain_trailers_alone_are_understood() -> None:
    decoded = errors.decode_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "x", [("orchestrator-stage", "rag"), ("grpc-retry-pushback-ms", "50")]
    )
    assert (decoded.stage, decoded.retry_after_s) == ("rag", 0.05)
