"""The one mapping from every failure to an HTTP status, OpenAI's error body and headers.

* :data:`STATUS` and :func:`http_of`: a :class:`flow.errors.FlowError` (what the flow and the HTTP
  layer raise) as its status, error type and headers (``Retry-After`` when the error says how long
  to wait; ``WWW-Authenticate`` on a 401; the key's ``x-ratelimit-*`` on a 429);
* :func:`refusal`: an admission verdict that refuses (:mod:`deployments.admission`) as a FlowError;
* :func:`validation_error`: pydantic's errors as one 400 naming every bad field;
* :func:`install`: the exception handlers, so nothing returns a bare 500 or ``{"detail": ...}``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flow.errors import KINDS, FlowError, redact
from serve.ids import id_headers, request_id

log = logging.getLogger("ray.serve")

# kind -> (HTTP status, OpenAI's error type)
STATUS: dict[str, tuple[int, str]] = {
    "invalid": (400, "invalid_request_error"),
    "unauthorized": (401, "invalid_request_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "invalid_request_error"),
    "timeout": (408, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "too_large": (413, "invalid_request_error"),
    "unsupported": (415, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "quota": (429, "insufficient_quota"),
    "overloaded": (503, "service_unavailable"),
    "unavailable": (503, "service_unavailable"),
}
assert set(STATUS) == set(KINDS), "every kind of flow error has its status"


class ApiError(Exception):
    """An error as the client gets it: status, OpenAI's error body and headers. Made from a
    :class:`FlowError` (:func:`http_of`) or, for the HTTP layer's own failures (an unknown route, a
    wrong method, an unexpected exception), here."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def http_of(err: FlowError) -> ApiError:
    """``err`` as the client gets it."""
    status, kind = STATUS[err.kind]
    headers: dict[str, str] = {}
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after_s)))
    headers.update(err.limits)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return ApiError(status, err.message, type=kind, param=err.param, code=err.code, headers=headers)


# an admission verdict's status (deployments.admission) -> the kind of error it is
_REFUSALS = {400: "invalid", 401: "unauthorized", 403: "forbidden", 429: "rate_limited"}


def refusal(verdict: Any) -> FlowError:
    """A verdict that refuses (401/403/429, or 400 for a request that can never fit its key's
    quota) as the FlowError the caller gets; a 429 says when to retry and the key's limits."""
    kind = "quota" if verdict.code == "insufficient_quota" else _REFUSALS[verdict.status]
    limited = verdict.status == 429
    return FlowError(kind, verdict.message, code=verdict.code, param="max_tokens" if verdict.status == 400 else None,
                     retry_after_s=max(1, math.ceil(verdict.retry_after)) if limited else None,
                     limits=(verdict.headers or {}) if limited else None)


def validation_error(errors: list[dict[str, Any]]) -> FlowError:
    """One 400 naming every problem in the body, OpenAI-style (``param`` is the first bad field)."""
    parts, params = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = ".".join(loc)
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unrecognized request argument"
        elif e.get("type") == "missing":
            msg = "required"
        elif e.get("type") == "json_invalid":
            msg = f"body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        got = e.get("input")
        shown = "" if e.get("type") in ("missing", "json_invalid", "extra_forbidden") or isinstance(got, dict | list) else f" (got {got!r})"
        parts.append(f"{param or 'body'}: {msg}{shown}")
        params.append(param or None)
    n = len(parts)
    message = ("; ".join(parts)) if n == 1 else f"{n} problems in the request: " + "; ".join(parts)
    return FlowError("invalid", message, param=params[0] if params else None, code="invalid_value")


def status_of(e: BaseException) -> int:
    """The status :func:`install`'s handlers give ``e`` (for counting before they run)."""
    if isinstance(e, RequestValidationError):
        return 400
    if isinstance(e, FlowError):
        return STATUS[e.kind][0]
    return getattr(e, "status_code", 500)


def error_response(err: ApiError, request: Request) -> JSONResponse:
    body = err.body()
    body["error"]["message"] = redact(body["error"]["message"])
    return JSONResponse(body, status_code=err.status, headers={**err.headers, **id_headers(request)})


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(http_of(validation_error(list(exc.errors()))), request)


async def _flow_error(request: Request, exc: FlowError) -> JSONResponse:
    return error_response(http_of(exc), request)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's and Starlette's own errors (a body that cannot be parsed, an unknown route, a wrong
    method) in OpenAI's format too (found by the schemathesis run: a bare ``{"detail": ...}``)."""
    status, detail = exc.status_code, str(exc.detail)
    if status == 400:
        message = (f"the request body could not be parsed ({detail}); send a JSON object with "
                   "Content-Type: application/json")
        err = ApiError(400, message, param="body", code="invalid_body")
    elif status == 404:
        err = ApiError(404, f"no route {request.method} {request.url.path}; see /docs", code="not_found")
    elif status == 405:
        err = ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    else:
        err = ApiError(status, detail or "request refused", code=f"http_{status}")
    err.headers.update(exc.headers or {})
    return error_response(err, request)


def install(app: FastAPI, *, on_unexpected=None) -> None:
    """Every error of ``app`` in OpenAI's format; ``on_unexpected()`` counts the 500s."""

    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception(f"unhandled error: {exc}")
        if on_unexpected is not None:
            on_unexpected()
        return error_response(
            ApiError(500, f"internal error ({type(exc).__name__}); quote request id {rid} when reporting it",
                     type="server_error", code="internal_error"),
            request,
        )

    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(FlowError, _flow_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
