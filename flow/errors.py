"""The flow's errors, in the flow's own words: what kind of failure, a message for the caller, the
code clients branch on, the field at fault and how long to wait before trying again. No HTTP status
is named here: ``serve/errors.py`` is the one place a :class:`FlowError` becomes a status, a JSON
error body and headers.

* :class:`FlowError` and :data:`KINDS`: every failure a request can meet;
* :func:`stage_unavailable`: a stage the request cannot do without failed (:class:`StageError`);
* :func:`redact` and :func:`public_detail`: no server path or exception text reaches a caller.
"""

from __future__ import annotations

import re

from deployments.errors import StageError

KINDS = (
    "invalid",       # the request's values cannot be served as they are
    "unauthorized",  # no caller could be identified (no key, an unknown or revoked one)
    "forbidden",     # the caller may not do this (scope, origin, auth off beyond this machine)
    "not_found",     # the thing named does not exist for this caller
    "timeout",       # the request did not arrive in time (a body read too slowly)
    "conflict",      # the service's state refuses it now (a limit reached, a build running)
    "too_large",     # over a size limit
    "unsupported",   # a media or file type the service does not take
    "rate_limited",  # over a rate limit: wait ``retry_after_s``
    "quota",         # the key's token quota is spent: wait ``retry_after_s``
    "overloaded",    # the service is at capacity: wait ``retry_after_s``
    "unavailable",   # something the request needs is down: wait ``retry_after_s`` (when known)
)


class FlowError(Exception):
    """A refusal or failure the caller is told of. ``kind`` is one of :data:`KINDS`; ``code`` is the
    stable string clients branch on (OpenAI's ``error.code``); ``param`` the request field at fault;
    ``retry_after_s`` whole seconds to wait (None: no advice); ``limits`` the caller's rate-limit
    state as the admission reports it (``x-ratelimit-*`` values), sent with a rate-limit refusal."""

    def __init__(self, kind: str, message: str, *, code: str | None, param: str | None = None,
                 retry_after_s: float | None = None, limits: dict[str, str] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"FlowError kind {kind!r} is not one of {KINDS}")
        super().__init__(message)
        self.kind, self.message, self.code, self.param = kind, message, code, param
        self.retry_after_s, self.limits = retry_after_s, dict(limits or {})

    def __repr__(self) -> str:
        return f"FlowError({self.kind!r}, {self.message!r}, code={self.code!r}, param={self.param!r})"


# An absolute file path (two or more parts): never shown to a client, only its last part.
_PATH = re.compile(r"(?<![\w.:/~-])(?:~/|/)(?:[\w.@+~-]+/)+([\w.@+~-]*)")
_ROUTE_PREFIXES = ("/v1/", "/health", "/metrics", "/docs", "/openapi.json", "/redoc")


def redact(text: str) -> str:
    """``text`` with server paths cut to their last part (``/srv/x/index/manifest.json`` ->
    ``…/manifest.json``); the service's own routes are left alone."""
    def cut(m: re.Match[str]) -> str:
        whole = m.group(0)
        return whole if whole.startswith(_ROUTE_PREFIXES) else f"…/{m.group(1)}"

    return _PATH.sub(cut, text)


def public_detail(err: StageError) -> str:
    """What a client is told about a stage's failure: the kind's own words, the exception's class
    for an unexpected error (its text stays in the logs), and no server path."""
    if err.kind == "error":
        return f"it raised {err.detail.split(':', 1)[0].strip() or 'an error'}"
    return redact(err.detail)


def stage_unavailable(what: str, err: StageError, *, code: str = "stage_unavailable",
                      retry_after: float = 5) -> FlowError:
    """A stage the request cannot do without failed: ``invalid`` when it refused the request's
    values, else ``unavailable``, to be tried again after ``retry_after`` seconds."""
    if err.kind == "invalid":
        return FlowError("invalid", f"{what} refused the request: {public_detail(err)}", code="invalid_value")
    return FlowError("unavailable", f"{what} is unavailable: {public_detail(err)}", code=code,
                     retry_after_s=max(1, round(retry_after)))
