"""One mapping from every failure to an HTTP status, OpenAI's error body and ``Retry-After``.

* :class:`ApiError`: a client-visible error; raised anywhere in the ingress.
* :func:`validation_error`: pydantic's errors as one 400 naming every bad field.
* :func:`stage_unavailable`: a stage that could not answer (:class:`StageError`) as the 503 or 400
  the client sees.
* :func:`install`: the exception handlers, so nothing returns a bare 500 or ``{"detail": ...}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.errors import StageError
from serve.ids import id_headers, request_id

log = logging.getLogger("ray.serve")


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


class ApiError(Exception):
    """A client-visible error, rendered in OpenAI's format by the ingress."""

    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
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
    return ApiError(400, message, param=params[0] if params else None, code="invalid_value")


def stage_unavailable(what: str, err: StageError, *, code: str = "stage_unavailable", retry_after: float = 5) -> ApiError:
    """A stage the request cannot do without failed: 400 when it refused the request's values
    (``invalid``), else 503 with ``Retry-After``."""
    if err.kind == "invalid":
        return ApiError(400, f"{what} refused the request: {public_detail(err)}", code="invalid_value")
    return ApiError(503, f"{what} is unavailable: {public_detail(err)}", type="service_unavailable", code=code,
                    headers={"Retry-After": str(max(1, round(retry_after)))})


async def state_call(pipeline: Any, what: str, fn: Any, *args: Any, timeout: float | None = None) -> Any:
    """A call on the service's state (``pipeline.state``) an endpoint cannot answer without: 503 +
    Retry-After, naming ``what`` was unavailable, once its retries are spent."""
    try:
        return await pipeline.state(fn, *args, timeout=timeout)
    except StageError as e:
        raise stage_unavailable(what, e, code="state_unavailable") from None


def status_of(e: BaseException) -> int:
    """The status :func:`install`'s handlers give ``e`` (for counting before they run)."""
    if isinstance(e, RequestValidationError):
        return 400
    if isinstance(e, ApiError):
        return e.status
    return getattr(e, "status_code", 500)


def error_response(err: ApiError, request: Request) -> JSONResponse:
    body = err.body()
    body["error"]["message"] = redact(body["error"]["message"])
    return JSONResponse(body, status_code=err.status, headers={**err.headers, **id_headers(request)})


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(list(exc.errors())), request)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc, request)


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
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
