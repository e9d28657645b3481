"""Serve's errors reach the pipeline as the right StageError kind, wrapped or not (a full generator
queue is backpressure, a 503 with Retry-After, never a failure that opens the breaker)."""

from __future__ import annotations

from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.errors import StageError, from_exception


class Wrapped(Exception):
    """How a streamed handle call delivers a replica-side error: a Ray error with ``.cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def test_backpressure_is_overloaded_wrapped_or_not():
    bp = BackPressureError(num_queued_requests=8, max_queued_requests=8)
    assert from_exception("generator", bp).kind == "overloaded"
    assert from_exception("generator", Wrapped(bp)).kind == "overloaded"


def test_unavailable_and_stage_errors_pass_through():
    assert from_exception("retriever", Wrapped(DeploymentUnavailableError("retriever"))).kind == "unavailable"
    inner = StageError("generator", "invalid", "seed out of range")
    assert from_exception("generator", Wrapped(inner)) is inner
    other = from_exception("router", ValueError("boom"))
    assert (other.kind, other.detail) == ("error", "ValueError: boom")
