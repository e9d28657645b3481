"""Admission in the HTTP layer, as FastAPI dependencies: who may call a route, and when its body is read.

Every route carries the one dependency of its access level (:class:`Access`, declared beside the
route's path: :mod:`serve.routetable`). It admits a request from its headers alone, before a byte
of its body is read: Serve's client timeout headers refused, the Host (auth off), the Origin of a
state-changing request, a declared body size, then :class:`deployments.admission.Admission`
(per-address limit, the API key as verified against the state database and cached, its scope,
per-key limits, quota: 401/403/429/413 in OpenAI's format; the key itself is never logged). A
cached key costs no database call. It sets the :class:`Caller` (:func:`caller` gives it to an
endpoint). Then, for routed work, the replica's queue slot is taken (:func:`slot`, a
:class:`Gate`), and only inside it is the body read (:func:`receive`), within its size limit and
read deadline, and a chat's tokens held against its key's quota. Refusals are
:class:`flow.errors.FlowError` s (``serve/errors.py`` gives their statuses).

FastAPI reads a body parameter before it runs any dependency, so a route takes its JSON body from
a dependency too (:func:`serve.routetable.json_body`), which runs after these.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.networks import LOCAL_HOSTS, host_name, in_networks, is_loopback, parse_networks
from deployments.errors import StageError
from flow.errors import FlowError, stage_unavailable
from flow.events import Reservation
from flow.metrics import METRICS
from flow.pipeline import Pipeline
from serve.errors import refusal
from serve.routetable import ADMIN, LEVELS, METRICS as METRICS_ACCESS, PUBLIC

log = logging.getLogger("ray.serve")
CHAT = "/v1/chat/completions"
DOCUMENTS = "/v1/documents"  # uploads: their own body limits (documents.*)
SERVE_HINTS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")  # Ray Serve's per-request overrides
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORWARDING = ("x-forwarded-for", "forwarded", "x-real-ip")
BEARER = HTTPBearer(auto_error=False, description="An API key (`ragraph keys create`), as `Authorization: Bearer`.")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request was admitted as: its key (None: no key, auth off or an open route) and scope
    (``user``, ``admin`` or ``metrics``; None when no key was checked)."""

    key_id: str | None = None
    scope: str | None = None


NOBODY = Caller()


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
            raise FlowError("invalid", f"header {name}: clients may not set Ray Serve's per-request overrides; the "
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
        raise FlowError("forbidden", f"{request.method} {request.url.path} from another web site is refused ({why}); "
                        "a browser page on another origin may not change this service (add it to "
                        "http.allowed_origins to allow it)", param="origin",
                        code="cross_site_request")


def check_declared_length(request: Request, limit: int, name: str) -> None:
    """A Content-Length over the limit is refused before a byte is read (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        METRICS.admission.labels("request_too_large").inc()
        raise FlowError("too_large", f"body: the request body is {int(declared)} bytes; the limit is {limit} "
                        f"({name})", param="body", code="request_too_large")


def body_limits(cfg, endpoint: str) -> tuple[int, str, float, str]:
    """(size limit, its setting, read deadline in seconds, its setting) of a route's body."""
    if endpoint == DOCUMENTS:  # uploads: their own limits
        return (cfg.documents.max_upload_bytes, "documents.max_upload_bytes",
                cfg.documents.upload_timeout_s, "documents.upload_timeout_s")
    lim = cfg.http.limits
    return lim.max_body_bytes, "http.limits.max_body_bytes", lim.body_timeout_s, "http.limits.body_timeout_s"


async def admit(request: Request, level: str) -> Caller:
    """Admission of one request to a route of access ``level`` (see the module docstring); raises
    :class:`FlowError` to refuse. Reads no byte of the body: the key, the caller's address and its
    limits are checked from the headers alone. The decision is the ingress's own
    (``pipeline.admission``, :class:`deployments.admission.Admission`): the database is asked only
    when a key is not in the key cache."""
    request.state.key_id = None
    request.state.caller = NOBODY
    endpoint = request.scope["route"].path
    pipeline: Pipeline = request.app.state.pipeline
    cfg = pipeline.cfg
    check_request_headers(request)
    if level == PUBLIC:  # probes (a pod's own address as Host); /health/ready details are admins' only
        return NOBODY
    if not cfg.governor.auth.enabled:
        check_host(request, cfg.http.allowed_hosts)
    check_origin(request, cfg.http.allowed_origins)
    if request.method in ("POST", "PUT", "PATCH"):
        limit, name, _, _ = body_limits(cfg, endpoint)
        check_declared_length(request, limit, name)
    if level == METRICS_ACCESS and cfg.governor.auth.metrics_open:
        return NOBODY
    token = bearer(request)
    ip = client_ip(request, cfg.http.trusted_proxies, cfg.http.forwarded_header)
    local = is_local(request, ip, cfg.http.trusted_proxies)
    admin_route = level == ADMIN
    if not cfg.governor.auth.enabled and admin_route and not local:
        METRICS.admission.labels("insufficient_scope").inc()
        raise FlowError("forbidden", f"{request.method} {endpoint} is an admin endpoint: with auth off "
                        "(governor.auth.enabled: false) only a caller on this machine (loopback) may use it",
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
        return NOBODY
    refuse_unless_allowed(request, verdict)
    if verdict.scope == "metrics" and level != METRICS_ACCESS:  # a scrape key reads /metrics and nothing else
        METRICS.admission.labels("insufficient_scope").inc()
        raise FlowError("forbidden", f"key {verdict.key_id} has scope 'metrics': it may read /metrics only",
                        code="insufficient_scope")
    if level == METRICS_ACCESS and verdict.scope not in ("admin", "metrics") and cfg.governor.auth.enabled:
        METRICS.admission.labels("insufficient_scope").inc()
        raise FlowError("forbidden", f"/metrics needs a key of scope 'metrics' or 'admin'; key {verdict.key_id} has "
                        f"scope {verdict.scope!r} (`ragraph keys create prometheus --scope metrics`)",
                        code="insufficient_scope")
    request.state.key_id = verdict.key_id
    request.state.token = token
    request.state.rate_headers = verdict.headers
    METRICS.saw_quota(verdict.key_id, verdict.headers)
    # with auth off, the operator on this machine may do anything; anyone else is an ordinary caller
    request.state.caller = Caller(verdict.key_id, verdict.scope if cfg.governor.auth.enabled or local else "user")
    return request.state.caller


def refuse_unless_allowed(request: Request, verdict) -> None:
    """An admission verdict that refuses, as its :class:`FlowError` (401/403/429, or 400 for a
    request that can never fit its key's quota)."""
    if verdict.allowed:
        return
    METRICS.admission.labels(verdict.code).inc()
    request.state.refused_key_id = verdict.key_id  # for the query log; the request is not admitted
    if verdict.code == "insufficient_quota":
        METRICS.saw_quota(verdict.key_id, None, spent=True)
    raise refusal(verdict)


class Access:
    """The one dependency that admits a caller to a route of its access level (``public``,
    ``user``, ``admin``, ``metrics``: :mod:`serve.routetable`). A keyed level declares the bearer
    scheme, so that the API's schema says which routes take a key."""

    def __init__(self, level: str) -> None:
        self.level = level

    async def __call__(self, request: Request) -> Caller:
        return await admit(request, self.level)


class KeyedAccess(Access):
    async def __call__(self, request: Request,
                       _: HTTPAuthorizationCredentials | None = Security(BEARER)) -> Caller:
        return await admit(request, self.level)


ACCESS = {level: (Access if level == PUBLIC else KeyedAccess)(level) for level in LEVELS}  # one per level


def caller(request: Request) -> Caller:
    """The admitted caller (a dependency for an endpoint that acts on the caller's behalf)."""
    return getattr(request.state, "caller", NOBODY)


async def slot(request: Request) -> AsyncIterator[None]:
    """This replica's queue slot (:class:`Gate`), held until the endpoint returns (a stream: until
    its first token); a dependency with ``scope="function"``."""
    async with gate_of(request).slot():
        yield


async def receive(request: Request) -> None:
    """After admission (and, for routed work, inside the replica's queue slot): read the body within
    its size limit and read deadline, then hold a chat's tokens against its key's quota."""
    endpoint = request.scope["route"].path
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
    plus the most its prompt can hold, which is what the prompt builder (:mod:`flow.prompt`) may
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
    raise FlowError("invalid", f"Host {name!r} is not accepted: with auth off this service answers only to localhost, "
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
                raise FlowError("too_large", f"body: the request body is over {limit} bytes, the limit ({name}); "
                                "reading stopped there", param="body", code="request_too_large")
            chunks.append(chunk)

    try:
        async with asyncio.timeout(timeout_s):
            await read()
    except TimeoutError:
        METRICS.admission.labels("body_timeout").inc()
        raise FlowError("timeout", f"body: not received within {timeout_s:g} s ({timeout_name}); {size} bytes had "
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
                raise FlowError("overloaded", f"the service is at capacity ({self.max_ongoing} requests running and "
                                f"{self.waiting} waiting in this replica); retry shortly", code="overloaded",
                                retry_after_s=1)
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


