"""How a stage call fails, in one type the ingress maps to a degraded answer or an HTTP status."""

from __future__ import annotations

class StageError(Exception):
    """A stage call failed. ``kind``: overloaded (queue full: backpressure) | unavailable (no
    replica, or it died) | timeout | stalled (no answer within an attempt's time) | error (the stage
    raised) | invalid (the stage refused the request's values: the client's fault, never retried)."""

    def __init__(self, stage: str, kind: str, detail: str) -> None:
        super().__init__(f"{stage} {kind}: {detail}")
        self.stage, self.kind, self.detail = stage, kind, detail

    def __reduce__(self):  # crosses Ray's object store intact
        return (StageError, (self.stage, self.kind, self.detail))


def _is(x: BaseException, name: str) -> bool:
    """``x`` is (a subclass of) the class called ``name``: Serve's errors may arrive as a copy of
    the class this process would import, so the name is what counts."""
    return any(c.__name__ == name for c in type(x).__mro__)


def from_exception(stage: str, e: BaseException) -> StageError:
    """A Serve handle call's exception as a :class:`StageError` (Ray's own errors by their kind)."""
    if isinstance(e, StageError):
        return e
    cause = getattr(e, "cause", None)
    if isinstance(cause, StageError):  # raised inside the replica, wrapped by Ray
        return cause
    # a streamed call through the proxy path delivers Serve's own errors wrapped (``.cause``, or
    # ``__cause__``), and not always as the class this process imported: match by class name too
    chain = [x for x in (e, cause, e.__cause__, e.__context__) if x is not None]
    if any(_is(x, "BackPressureError") for x in chain):
        return StageError(stage, "overloaded", "its queue is full")
    if any(_is(x, "DeploymentUnavailableError") for x in chain):
        return StageError(stage, "unavailable", "no replica is running")
    name = type(e).__name__
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name:
        return StageError(stage, "unavailable", f"replica died ({name})")
    cause = cause or e
    return StageError(stage, "error", f"{type(cause).__name__}: {cause}".splitlines()[0][:300])
