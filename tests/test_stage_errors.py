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


def test_backpressure_by_name_and_chained():
    """Through Serve's proxy path the error arrives chained, and possibly as another copy of the class."""
    Foreign = type("BackPressureError", (Exception,), {})
    assert from_exception("generator", Foreign("Request dropped due to backpressure")).kind == "overloaded"
    try:
        try:
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)
        except BackPressureError as bp:
            raise RuntimeError("stream failed") from bp
    except RuntimeError as e:
        assert from_exception("generator", e).kind == "overloaded"


def test_serve_generator_maps_a_refusal_raised_by_remote_itself():
    import asyncio

    from deployments.generator import GenRequest, ServeGenerator

    class Method:
        def remote(self, request):
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

    class Handle:
        def options(self, **kw):
            return self

        deltas = Method()

    async def first():
        return await anext(ServeGenerator(Handle()).generate(GenRequest(messages=[], max_tokens=1)))

    try:
        asyncio.run(first())
    except StageError as e:
        assert e.kind == "overloaded"
    else:
        raise AssertionError("no error")
