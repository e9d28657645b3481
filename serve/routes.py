"""The HTTP routes, declared once: the Serve ingress (``serve.app``) and the in-process app
(``serve.local``) both serve :func:`make_app`'s FastAPI app, which reads its pipeline from
``app.state.pipeline``.

Routes: ``POST /v1/chat/completions`` (OpenAI-compatible, ``stream`` as SSE), ``POST /v1/search``,
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /v1/usage``, ``GET /v1/cache/stats`` and
``DELETE /v1/cache`` (admin), ``GET /health``, ``GET /health/ready``, ``GET /metrics``. Every error
is in OpenAI's format (``serve.errors``); nothing returns a bare 500.

Every routed request but ``/health*`` (and ``/metrics`` when ``governor.auth.metrics_open``) is
admitted first, in :class:`ObservedRoute`, from its headers alone: Serve's client timeout headers
refused, the Host (auth off), the Origin of a state-changing request, a declared body size, then
:class:`deployments.admission.Admission` (per-address limit, the API key as verified by the
governor and cached, its scope, per-key limits, quota: 401/403/429/413 in OpenAI's format; the key
itself is never logged). Only then, inside the replica's queue slot (:class:`Gate`), is the body
read, within its size limit and read deadline, and a chat's tokens held against its key's quota.
A cached key costs no governor call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from common.networks import LOCAL_HOSTS, host_name, in_networks, is_loopback, parse_networks
from deployments.errors import StageError
from serve import openai
from serve.api import ChatRequest, SearchRequest
from serve.apidocs import ROUTES as API_DOCS_ROUTES
from serve.conversations import ROUTES as HISTORY_ROUTES, check_conversation, recorded
from serve.documents import DOCUMENTS, ROUTES as DOCUMENT_ROUTES
from serve.errors import ApiError, install, stage_unavailable, state_call, status_of
from serve.events import ChatEvent, Done, Reservation
from serve.ids import id_headers, request_id
from serve.metrics import METRICS
from serve.pipeline import Pipeline
from serve.querylog import QueryLog, note, question_of
from serve.routetable import RouteTable
from serve.ui import OPEN as PAGE_ROUTES, ROUTES as PAGE_ROUTE_LIST

log = logging.getLogger("ray.serve")
TITLE = "ragraph"
VERSION = "0.1.0"
DESCRIPTION = "Retrieval-augmented chat on a Ray Serve graph: router -> hybrid retriever -> reranker -> vLLM."


OPEN_ROUTES = ("/health", "/health/ready", *PAGE_ROUTES)  # the chat page and its files (serve/ui.py) load without a key
CHAT = "/v1/chat/completions"
CACHE_ROUTES = RouteTable()  # the response cache's operations (below), admin routes


SERVE_HINTS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")  # Ray Serve's per-request overrides
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORWARDING = ("x-forwarded-for", "forwarded", "x-real-ip")


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


@functools.lru_cache(maxsize=8)
def _trusted(proxies: tuple[str, ...]):
    return parse_networks("http.trusted_proxies", proxies)  # parsed once, not per request


def _forwarded_hops(request: Request, header: str) -> list[str]:
    """The client addresses the trusted proxy wrote in ``header`` (``http.forwarded_header``), nearest
    last: X-Forwarded-For, the ``for=`` of RFC 7239 ``Forwarded``, or X-Real-IP. Only that header is
    read: one the proxy does not set may be the client's own, passed through."""
    value = request.headers.get(header, "")
    if header == "x-real-ip":
        return [value.strip()] if value.strip() else []
    if header == "x-forwarded-for":
        return [x.strip() for x in value.split(",") if x.strip()]
    hops = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, v = pair.strip().partition("=")
            if name.lower() == "for" and v:
                v = v.strip().strip('"')
                hops.append(v[1:v.index("]")] if v.startswith("[") and "]" in v
                            else v.rsplit(":", 1)[0] if v.count(":") == 1 else v)
    return hops


def client_ip(request: Request, trusted_proxies: list[str], header: str = "x-forwarded-for") -> str:
    """The caller's address: the nearest untrusted address a trusted proxy wrote in ``header``
    (``http.forwarded_header``), else the peer (a forged header from anyone else is ignored)."""
    peer = request.client.host if request.client else "unknown"
    nets = _trusted(tuple(trusted_proxies))
    if not nets or not in_networks(peer, nets):
        return peer
    for hop in reversed(_forwarded_hops(request, header)):
        if not in_networks(hop, nets):
            return hop
    return peer


def via_unknown_proxy(request: Request, trusted_proxies: list[str]) -> bool:
    """The request carries a forwarding header but its peer is not a trusted proxy: it came through
    a proxy this service knows nothing of (a reverse proxy on this host makes every client look like
    127.0.0.1). Such a caller is never taken as loopback (no admin with auth off) nor as an address
    of ``exempt_ips``; it is still counted under its peer's address."""
    peer = request.client.host if request.client else "unknown"
    nets = _trusted(tuple(trusted_proxies))
    return (not nets or not in_networks(peer, nets)) and any(request.headers.get(h) for h in FORWARDING)


def is_local(request: Request, ip: str, trusted_proxies: list[str]) -> bool:
    """The caller is on this machine: a loopback address, not behind an unknown proxy."""
    return is_loopback(ip) and not via_unknown_proxy(request, trusted_proxies)


def check_request_headers(request: Request) -> None:
    """Ray Serve lets a client set its own request timeout (``x-request-timeout-seconds``; 0 turns it
    off) and turn off disconnect detection (``x-request-disconnect-disabled``): a client could hold a
    replica's slot for ever. Such a request is refused before anything else, so it ends at once."""
    for name in SERVE_HINTS:
        if name in request.headers:
            METRICS.admission.labels("header_not_allowed").inc()
            raise ApiError(400, f"header {name}: clients may not set Ray Serve's per-request overrides; the "
                           "service's own timeouts apply (http.timeouts)", param=name, code="header_not_allowed")


def check_origin(request: Request, allowed: list[str]) -> None:
    """A state-changing request sent by a web page of another site is refused (cross-site request
    forgery: a page the operator visits could post to ``http://127.0.0.1:8000``, which with auth off
    is admin). Browsers say where a request comes from: ``Sec-Fetch-Site`` (``same-origin`` and
    ``none``, typed by the user, pass; ``cross-site`` is refused; ``same-site``, another port or
    subdomain, passes only with an Origin of this service), and ``Origin``, which without
    ``Sec-Fetch-Site`` must be this service's own (its Host). ``http.allowed_origins`` are let in
    whatever the browser says. Clients that are not browsers send neither and are not affected; a
    proxy that rewrites Host does not break the chat page (its browser says ``same-origin``)."""
    if request.method not in STATE_CHANGING:
        return
    site = request.headers.get("sec-fetch-site", "").strip().lower()
    origin = request.headers.get("origin")
    o = origin.strip().lower().rstrip("/") if origin is not None else None
    if o is not None and ("*" in allowed or o in {a.strip().lower().rstrip("/") for a in allowed}):
        return
    if site in ("same-origin", "none"):
        return
    own = o is None or o.partition("://")[2] == request.headers.get("host", "").strip().lower()
    why = None
    if site == "cross-site":
        why = "Sec-Fetch-Site: cross-site"
    elif not own:
        why = f"Origin {origin!r} is not this service's own"
    if why:
        METRICS.admission.labels("cross_site").inc()
        raise ApiError(403, f"{request.method} {request.url.path} from another web site is refused ({why}); "
                       "a browser page on another origin may not change this service (add it to "
                       "http.allowed_origins to allow it)", type="permission_error", param="origin",
                       code="cross_site_request")


def check_declared_length(request: Request, limit: int, name: str) -> None:
    """A Content-Length over the limit is refused before a byte is read (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        METRICS.admission.labels("request_too_large").inc()
        raise ApiError(413, f"body: the request body is {int(declared)} bytes; the limit is {limit} "
                       f"({name})", param="body", code="request_too_large")


def body_limits(cfg, endpoint: str) -> tuple[int, str, float, str]:
    """(size limit, its setting, read deadline in seconds, its setting) of a route's body."""
    if endpoint == DOCUMENTS:  # uploads: their own limits
        return (cfg.documents.max_upload_bytes, "documents.max_upload_bytes",
                cfg.documents.upload_timeout_s, "documents.upload_timeout_s")
    lim = cfg.http.limits
    return lim.max_body_bytes, "http.limits.max_body_bytes", lim.body_timeout_s, "http.limits.body_timeout_s"


async def admit(request: Request, endpoint: str) -> None:
    """Admission of one request (see the module docstring); raises :class:`ApiError` to refuse.
    Reads no byte of the body: the key, the caller's address and its limits are checked from the
    headers alone (the body is read afterwards, in :func:`receive`). Sets ``request.state.key_id``
    for the usage ledger. The decision is the ingress's own (``pipeline.admission``,
    :class:`deployments.admission.Admission`): the governor is asked only when a key is not in the
    key cache."""
    request.state.key_id = None
    pipeline: Pipeline = request.app.state.pipeline
    cfg = pipeline.cfg
    check_request_headers(request)
    if endpoint in OPEN_ROUTES:  # probes (a pod's own address as Host); /health/ready details are admins' only
        return
    if not cfg.governor.auth.enabled:
        check_host(request, cfg.http.allowed_hosts)
    check_origin(request, cfg.http.allowed_origins)
    if request.method in ("POST", "PUT", "PATCH"):
        limit, name, _, _ = body_limits(cfg, endpoint)
        check_declared_length(request, limit, name)
    if endpoint == "/metrics" and cfg.governor.auth.metrics_open:
        return
    token = bearer(request)
    ip = client_ip(request, cfg.http.trusted_proxies, cfg.http.forwarded_header)
    local = is_local(request, ip, cfg.http.trusted_proxies)
    admin_route = (request.method, endpoint) in ADMIN_ROUTES
    if not cfg.governor.auth.enabled and admin_route and not local:
        METRICS.admission.labels("insufficient_scope").inc()
        raise ApiError(403, f"{request.method} {endpoint} is an admin endpoint: with auth off (governor.auth.enabled: "
                       "false) only a caller on this machine (loopback) may use it", type="permission_error",
                       code="insufficient_scope")
    try:
        verdict = await pipeline.admission.admit(
            token, ip, endpoint, admin_route, verify=functools.partial(pipeline.state, pipeline.governor.verify),
            exempt=not via_unknown_proxy(request, cfg.http.trusted_proxies))
    except StageError as e:
        if cfg.governor.auth.enabled:  # fail closed: no key (or no limit) can be checked
            if e.stage == "rate_limits":
                raise stage_unavailable("the rate-limit storage (governor.rate_limits.storage)", e,
                                        code="rate_limits_unavailable") from None
            raise stage_unavailable("the state database (API keys cannot be checked)", e, code="state_unavailable") from None
        METRICS.admission.labels(f"{e.stage}_unavailable_open").inc()
        log.warning(f"{e.stage} unavailable, request admitted without limits (auth is off): {e}")
        return
    refuse_unless_allowed(request, verdict)
    if verdict.scope == "metrics" and endpoint != "/metrics":  # a scrape key reads /metrics and nothing else
        METRICS.admission.labels("insufficient_scope").inc()
        raise ApiError(403, f"key {verdict.key_id} has scope 'metrics': it may read /metrics only",
                       type="permission_error", code="insufficient_scope")
    if endpoint == "/metrics" and verdict.scope not in ("admin", "metrics") and cfg.governor.auth.enabled:
        METRICS.admission.labels("insufficient_scope").inc()
        raise ApiError(403, f"/metrics needs a key of scope 'metrics' or 'admin'; key {verdict.key_id} has scope "
                       f"{verdict.scope!r} (`ragraph keys create prometheus --scope metrics`)",
                       type="permission_error", code="insufficient_scope")
    request.state.key_id = verdict.key_id
    request.state.token = token
    request.state.rate_headers = verdict.headers
    METRICS.saw_quota(verdict.key_id, verdict.headers)
    # with auth off, the operator on this machine may do anything; anyone else is an ordinary caller
    request.state.scope = verdict.scope if cfg.governor.auth.enabled or local else "user"


def refuse_unless_allowed(request: Request, verdict) -> None:
    """An admission verdict that refuses, as OpenAI's error (401/403/429, or 400 for a request that
    can never fit its key's quota)."""
    if verdict.allowed:
        return
    METRICS.admission.labels(verdict.code).inc()
    request.state.refused_key_id = verdict.key_id  # for the query log; the request is not admitted
    if verdict.code == "insufficient_quota":
        METRICS.saw_quota(verdict.key_id, None, spent=True)
    headers = {"Retry-After": str(max(1, math.ceil(verdict.retry_after))), **(verdict.headers or {})} \
        if verdict.status == 429 else {}
    if verdict.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    kind = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error", 429: (
        "insufficient_quota" if verdict.code == "insufficient_quota" else "rate_limit_error")}[verdict.status]
    raise ApiError(verdict.status, verdict.message, type=kind, code=verdict.code, headers=headers,
                   param="max_tokens" if verdict.status == 400 else None)


async def receive(request: Request, endpoint: str) -> None:
    """After admission (and, for routed work, inside the replica's queue slot): read the body within
    its size limit and read deadline, then hold a chat's tokens against its key's quota."""
    cfg = request.app.state.pipeline.cfg
    if request.method in ("POST", "PUT", "PATCH"):
        limit, name, deadline, deadline_name = body_limits(cfg, endpoint)
        await read_body(request, limit, name, timeout_s=deadline, timeout_name=deadline_name)
    if endpoint == CHAT and getattr(request.state, "token", None) and getattr(request.state, "key_id", None):
        pipeline: Pipeline = request.app.state.pipeline
        tokens = quota_hold(request, cfg)
        try:
            verdict = await pipeline.admission.reserve(request.state.token, tokens,
                                                       verify=functools.partial(pipeline.state, pipeline.governor.verify))
        except StageError as e:
            raise stage_unavailable("the state database (API keys cannot be checked)", e, code="state_unavailable") from None
        refuse_unless_allowed(request, verdict)
        if verdict.headers:
            request.state.rate_headers = {**(request.state.rate_headers or {}), **verdict.headers}
            METRICS.saw_quota(verdict.key_id, verdict.headers)
        if verdict.reserved:
            request.state.reservation = Reservation(verdict.key_id, verdict.reserved)


def quota_hold(request: Request, cfg) -> int:
    """Tokens a chat is held to against its key's quota until it ends: the answer it may ask for
    plus the most its prompt can hold, which is what the prompt builder (:mod:`serve.prompt`) may
    fill: the instructions and the request's text (at about 3 characters a token) plus at most
    ``generator.context_tokens`` of passages, and never more than the context window leaves."""
    g = cfg.generator
    answer = g.max_tokens
    raw = getattr(request, "_body", b"") or b""
    try:
        body = json.loads(raw) if raw else {}
        asked = body.get("max_completion_tokens") or body.get("max_tokens") if isinstance(body, dict) else None
        if isinstance(asked, int) and asked > 0:
            answer = min(asked, g.max_tokens_limit)
    except ValueError:  # not JSON: validation will refuse it, and the hold is released then
        pass
    prompt = (len(g.system_prompt) + len(raw)) // 3 + PROMPT_FRAME_TOKENS + g.context_tokens
    return answer + min(prompt, g.max_model_len - answer)


PROMPT_FRAME_TOKENS = 64  # the chat template's and the blocks' own tokens


def check_host(request: Request, allowed: list[str]) -> None:
    """With auth off, only local Host names (and ``http.allowed_hosts``): a web page that rebinds its
    own DNS name to 127.0.0.1 cannot read this service from a browser on this machine."""
    if "*" in allowed:
        return
    name = host_name(request.headers.get("host", ""))
    if name in LOCAL_HOSTS or name in {h.lower() for h in allowed}:
        return
    METRICS.admission.labels("invalid_host").inc()
    raise ApiError(400, f"Host {name!r} is not accepted: with auth off this service answers only to localhost, "
                   "127.0.0.1 and ::1 (add names to http.allowed_hosts, or turn auth on)", param="host",
                   code="invalid_host")


async def read_body(request: Request, limit: int, name: str = "http.limits.max_body_bytes", *,
                    timeout_s: float | None = None, timeout_name: str = "http.limits.body_timeout_s") -> None:
    """Read the body, stopping at ``limit`` bytes (413) whether or not Content-Length was sent, and
    at ``timeout_s`` seconds (408: a client that trickles its body cannot hold a slot); the bytes
    read are kept for the route (Starlette's ``Request.body()`` returns them)."""
    check_declared_length(request, limit, name)
    chunks, size = [], 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                METRICS.admission.labels("request_too_large").inc()
                raise ApiError(413, f"body: the request body is over {limit} bytes, the limit ({name}); "
                               "reading stopped there", param="body", code="request_too_large")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await read()
    except TimeoutError:
        METRICS.admission.labels("body_timeout").inc()
        raise ApiError(408, f"body: not received within {timeout_s:g} s ({timeout_name}); {size} bytes had "
                       "arrived", param="body", code="request_timeout") from None
    request._body = b"".join(chunks)  # what Request.body() returns from now on


class Gate:
    """The ingress replica's own admission queue: at most ``max_ongoing`` requests run, at most
    ``max_queued`` wait, and the rest get OpenAI's 503 JSON with ``Retry-After``. Serve's own
    refusal is plain text, so the ingress deployment is given room for all of them
    (:func:`serve.graph.deployment_options`) and the limit is kept here. A slot is held while the
    route's handler runs: for a stream, until its first token (the generator's own queue bounds
    the streams in flight)."""

    def __init__(self, max_ongoing: int, max_queued: int) -> None:
        self.max_ongoing, self.max_queued = max_ongoing, max_queued
        self._slots = asyncio.Semaphore(max_ongoing)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked():
            if self.max_queued != -1 and self.waiting >= self.max_queued:
                METRICS.admission.labels("ingress_overloaded").inc()
                raise ApiError(503, f"the service is at capacity ({self.max_ongoing} requests running and "
                               f"{self.waiting} waiting in this replica); retry shortly", type="service_unavailable",
                               code="overloaded", headers={"Retry-After": "1"})
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        try:
            yield
        finally:
            self._slots.release()


def gate_of(request: Request) -> Gate:
    gate = getattr(request.app.state, "gate", None)
    if gate is None:
        d = request.app.state.pipeline.cfg.http.deployment
        gate = request.app.state.gate = Gate(d.max_ongoing_requests, d.max_queued_requests)
    return gate


class ObservedRoute(APIRoute):
    """Admits (:func:`admit`), counts and times every routed request (``rag_http_requests_total``,
    ``..._duration_seconds``).

    A route class, not an ``@app.middleware``: Ray Serve's class-based ingress does not run the
    app's HTTP middleware (measured on Ray 2.60: the counter stayed at 0), but it does run the
    route's handler. Errors are counted with the status their exception handler will give them."""

    def get_route_handler(self):
        inner = super().get_route_handler()
        endpoint = self.path

        async def handler(request: Request) -> Response:
            t = request.state.started = time.perf_counter()
            response = None
            try:
                await admit(request, endpoint)  # from the headers alone: no body byte is read before it
                if endpoint in OPEN_ROUTES or endpoint == "/metrics":
                    await receive(request, endpoint)
                    response = await inner(request)
                else:
                    async with gate_of(request).slot():  # a body is read only inside a queue slot
                        await receive(request, endpoint)
                        response = await inner(request)
            except Exception as e:
                METRICS.http_requests.labels(request.method, endpoint, str(status_of(e))).inc()
                log_query(request, endpoint, status_of(e), e)
                raise
            finally:
                if not isinstance(response, StreamingResponse):  # a stream releases its quota hold at its end
                    request.app.state.pipeline.settle(getattr(request.state, "reservation", None))
            if getattr(request.state, "rate_headers", None):  # OpenAI's x-ratelimit-* for the key's limits
                response.headers.update(request.state.rate_headers)
            METRICS.http_requests.labels(request.method, endpoint, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):  # a stream is observed at its last byte
                METRICS.http_duration.labels(endpoint).observe(time.perf_counter() - t)
                log_query(request, endpoint, response.status_code)
            return response

        return handler


def query_log_of(request: Request) -> QueryLog | None:
    """This process's query log (``observability.query_log``), made at the first request; None when off."""
    state = request.app.state
    if not hasattr(state, "query_log"):
        try:
            state.query_log = QueryLog.from_config(state.pipeline.cfg)
        except OSError as e:  # an unwritable folder must not fail requests: said once, then no log
            log.error(f"query log off: cannot open it: {e}")
            state.query_log = None
    return state.query_log


def log_query(request: Request, endpoint: str, status: int, error: Exception | None = None) -> None:
    """Write this request's query-log line (not for probes or /metrics). Never raises."""
    if endpoint in OPEN_ROUTES or endpoint == "/metrics":
        return
    try:
        qlog = query_log_of(request)
        if qlog is None:
            return
        started = getattr(request.state, "started", None)
        code = (getattr(error, "code", None) or type(error).__name__) if error is not None else None
        qlog.write(qlog.line(
            endpoint=endpoint, method=request.method, status=status,
            duration_s=time.perf_counter() - started if started is not None else 0.0,
            request_id=request_id(request),
            key_id=getattr(request.state, "key_id", None) or getattr(request.state, "refused_key_id", None),
            fields=getattr(request.state, "query_fields", None), error=code,
        ))
    except Exception as e:  # noqa: BLE001 - a log line must never fail the request it describes
        log.warning(f"query log: line not written: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# route bodies


def no_cache(request: Request) -> bool:
    return "no-cache" in request.headers.get("cache-control", "").lower()


async def chat_response(pipeline: Pipeline, body: ChatRequest, request: Request) -> Response:
    rid = request_id(request)
    t = time.perf_counter()
    await check_conversation(request, body)  # rag.conversation_id: 404 before any work
    prep = await pipeline.prepare(body, rid, key_id=getattr(request.state, "key_id", None),
                                  reservation=getattr(request.state, "reservation", None),
                                  bypass_cache=no_cache(request))
    note(request, trace=prep.trace, question=question_of(body))  # the query log (serve/querylog.py)
    if not body.stream:
        result = await openai.completion(recorded(request, body, pipeline.chat_events(body, prep)),
                                         request_id=rid, model=pipeline.model)
        note(request, rag=result.get("rag"), usage=result.get("usage"))
        return JSONResponse(result, headers=id_headers(request))
    events = recorded(request, body, pipeline.chat_events(body, prep))  # the answered request id, the turn
    first = await anext(events)  # generation has started (or degraded, or raised a 503)

    async def replay() -> AsyncIterator[ChatEvent]:
        yield first
        async for ev in events:
            if isinstance(ev, Done):
                note(request, rag=ev.rag, usage=ev.usage)
            yield ev

    async def body_iter() -> AsyncIterator[str]:
        try:
            async for line in openai.sse_stream(
                replay(), request_id=rid, model=pipeline.model,
                include_usage=bool(body.stream_options and body.stream_options.include_usage),
            ):
                yield line
        finally:
            await events.aclose()
            pipeline.settle(prep.reservation)  # if nothing was generated (a cache hit, sources only)
            METRICS.http_duration.labels("/v1/chat/completions").observe(time.perf_counter() - t)
            log_query(request, CHAT, 200)  # at the stream's last byte (or when the client left)

    return StreamingResponse(
        body_iter(), media_type="text/event-stream",
        headers={**id_headers(request), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def search_response(pipeline: Pipeline, body: SearchRequest, request: Request) -> JSONResponse:
    rid = request_id(request)
    note(request, question=body.query, strategy=body.strategy or pipeline.cfg.retriever.strategy)
    result = await pipeline.search(body, rid)
    note(request, search=result)
    return JSONResponse(result, headers=id_headers(request))


async def ready_response(pipeline: Pipeline, request: Request) -> JSONResponse:
    """Readiness: the verdict is reused for ``http.ready_cache_s`` (the endpoint is open to anyone,
    and each check asks Serve's controller and the retriever); what is wrong, in detail, only for an
    admin (auth on: an admin key; auth off: a caller on this machine). Others see each check's
    ok / not ready."""
    cache = getattr(request.app.state, "ready_cache", None)
    now = time.monotonic()
    if cache is not None and now - cache[0] < pipeline.cfg.http.ready_cache_s:
        problems = cache[1]
    else:
        problems = await pipeline.stages.readiness()
        request.app.state.ready_cache = (now, problems)
    missing = {k: v for k, v in problems.items() if v}
    detail = await _is_admin(pipeline, request)
    checks = {k: (v or "ok") if detail else ("ok" if not v else "not ready") for k, v in problems.items()}
    body = {"status": "ready" if not missing else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if not missing else 503, headers={} if not missing else {"Retry-After": "5"})


async def _is_admin(pipeline: Pipeline, request: Request) -> bool:
    """Whether the caller of an open route may see details (never raises: no key is no details)."""
    cfg = pipeline.cfg
    ip = client_ip(request, cfg.http.trusted_proxies, cfg.http.forwarded_header)
    if not cfg.governor.auth.enabled:
        return is_local(request, ip, cfg.http.trusted_proxies)
    token = bearer(request)
    if not token:
        return False
    try:
        verdict = await pipeline.admission.admit(token, ip, "/health/ready", True,
                                                 verify=functools.partial(pipeline.state, pipeline.governor.verify))
    except StageError:
        return False
    return verdict.allowed and verdict.scope == "admin"


async def usage_response(pipeline: Pipeline, request: Request, key_id: str | None, all_keys: bool) -> dict:
    """The caller's token usage; an admin may ask for another key's (``key_id``) or every key's."""
    own = getattr(request.state, "key_id", None)
    if (key_id or all_keys) and getattr(request.state, "scope", None) != "admin":
        raise ApiError(403, "key_id and all need an admin key; without them you see your own usage",
                       type="permission_error", param="key_id" if key_id else "all", code="insufficient_scope")
    if all_keys:
        return await state_call(pipeline, "usage", pipeline.governor.all_usage)
    usage = await state_call(pipeline, "usage", pipeline.governor.usage, key_id or own)
    if usage is None:
        raise ApiError(404, f"no API key has id {key_id!r}; `ragraph keys list --all` shows them", param="key_id",
                       code="key_not_found")
    return {"object": "usage", **usage}


async def cache_call(pipeline: Pipeline, fn: Any) -> Any:
    return await state_call(pipeline, "the response cache", fn)


def models_list(pipeline: Pipeline) -> dict:
    return {
        "object": "list",
        "data": [{"id": pipeline.model, "object": "model", "created": 0, "owned_by": "ragraph",
                  "root": pipeline.cfg.models.generator.name}],  # the model's name, never its folder here
    }


def model_card(pipeline: Pipeline, model_id: str) -> dict:
    if model_id != pipeline.model:
        raise ApiError(404, f"the model {model_id!r} does not exist; this service serves {pipeline.model!r}",
                       param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ragraph"}


# ---------------------------------------------------------------------------------------------
# the routes


router = APIRouter(route_class=ObservedRoute)


def pipeline_of(request: Request) -> Pipeline:
    return request.app.state.pipeline


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request) -> Response:
    return await chat_response(pipeline_of(request), body, request)


@router.post("/v1/search")
async def search(body: SearchRequest, request: Request) -> JSONResponse:
    return await search_response(pipeline_of(request), body, request)


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return models_list(pipeline_of(request))


@router.get("/v1/usage")
async def usage(request: Request, key_id: str | None = None, all_keys: bool = Query(False, alias="all")) -> dict:
    return await usage_response(pipeline_of(request), request, key_id, all_keys)


@CACHE_ROUTES.route("GET", "/v1/cache/stats", admin=True)
async def cache_stats(request: Request) -> dict:
    pipeline = pipeline_of(request)
    return await cache_call(pipeline, pipeline.governor.cache_stats)


@CACHE_ROUTES.route("DELETE", "/v1/cache", admin=True)
async def cache_clear(request: Request) -> dict:
    pipeline = pipeline_of(request)
    return {"object": "cache.cleared", "removed": await cache_call(pipeline, pipeline.governor.cache_clear)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict:
    return model_card(pipeline_of(request), model_id)


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    return await ready_response(pipeline_of(request), request)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    METRICS.saw_published(pipeline_of(request).cfg.indexing.dir)  # for the IndexNotReloaded alert
    return Response(METRICS.render(), media_type="text/plain; version=0.0.4")


# The API's own documentation, admitted like every other route: behind the key when auth is on (the
# /docs and /redoc pages, with their pinned files and CSP, are serve/apidocs.py's).
@router.get("/openapi.json", include_in_schema=False)
async def openapi_schema(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


_TABLES = (CACHE_ROUTES, DOCUMENT_ROUTES, HISTORY_ROUTES, PAGE_ROUTE_LIST, API_DOCS_ROUTES)
for _path, _methods, _endpoint, _options in [r for table in _TABLES for r in table.routes]:
    # the response cache; the documents API and index operations; conversations and feedback; the chat page;
    # the API documentation pages
    router.add_api_route(_path, _endpoint, methods=_methods, **_options)
# (method, path) only an admin key may call: the cache's, every route of serve/documents.py, GET /v1/feedback
ADMIN_ROUTES: frozenset[tuple[str, str]] = frozenset().union(*(table.admin for table in _TABLES))


def make_app(**kw: Any) -> FastAPI:
    """A FastAPI app with every route and error handler; set ``app.state.pipeline`` before serving.
    The documentation routes are :data:`router`'s own (admitted), not FastAPI's open ones."""
    kw = {"docs_url": None, "redoc_url": None, "openapi_url": None, **kw}
    app = FastAPI(title=TITLE, version=VERSION, description=DESCRIPTION, **kw)
    install(app, on_unexpected=lambda: METRICS.errors.labels("ingress", "error").inc())
    app.include_router(router)
    return app
