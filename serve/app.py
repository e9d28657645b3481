"""The FastAPI ingress, as a Ray Serve deployment that composes the stage handles.

Routes: ``POST /v1/chat/completions`` (OpenAI-compatible, ``stream`` as SSE), ``POST /v1/search``,
``GET /v1/models``, ``GET /v1/usage``, ``GET /v1/cache/stats`` and ``DELETE /v1/cache`` (admin),
``GET /health``, ``GET /health/ready``, ``GET /metrics``. Every error is in OpenAI's format;
nothing returns a bare 500. The graph itself is built by :func:`deployments.graph.build_app`.

Every routed request but ``/health*`` (and ``/metrics`` when ``governor.auth.metrics_open``) is
admitted first, in :class:`ObservedRoute`: body size, then the governor's verdict on its API key,
rate limits and quota (401/403/429/413 in OpenAI's format; the key itself is never logged).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve

from deployments.retriever import Filters, Passage
from deployments.router import Message
from serve.api import ApiError, ChatRequest, SearchRequest, validation_error
from serve.limits import in_networks, parse_networks
from serve.metrics import Metrics
from serve.pipeline import GenChunk, Pipeline, StageError, StageReply, new_request_id

log = logging.getLogger("ray.serve")
METRICS = Metrics()  # one registry per ingress process

app = FastAPI(
    title="ragraph",
    version="0.1.0",
    description="Retrieval-augmented chat on a Ray Serve graph: router -> hybrid retriever -> reranker -> vLLM.",
)


def request_id(request: Request) -> str:
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # outside Serve (tests of the app alone)
        rid = ""
    return rid or request.headers.get("x-request-id") or new_request_id()


def error_response(err: ApiError, rid: str) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers={**err.headers, "X-Request-ID": rid})


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(validation_error(list(exc.errors())), request_id(request))


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc, request_id(request))


@app.exception_handler(StarletteHTTPException)
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
    return error_response(err, request_id(request))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    rid = request_id(request)
    log.exception(f"unhandled error: {exc}")
    METRICS.errors.labels("ingress", "error").inc()
    return error_response(
        ApiError(500, f"internal error ({type(exc).__name__}); quote request id {rid} when reporting it",
                 type="server_error", code="internal_error"),
        rid,
    )


OPEN_ROUTES = ("/health", "/health/ready")
ADMIN_ROUTES = {("GET", "/v1/cache/stats"), ("DELETE", "/v1/cache")}


def bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


@functools.lru_cache(maxsize=8)
def _trusted(proxies: tuple[str, ...]):
    return parse_networks("http.trusted_proxies", proxies)  # parsed once, not per request


def client_ip(request: Request, trusted_proxies: list[str]) -> str:
    """The peer address, or the nearest untrusted address in X-Forwarded-For when the peer is a
    trusted proxy (a forged header from anyone else is ignored)."""
    peer = request.client.host if request.client else "unknown"
    nets = _trusted(tuple(trusted_proxies))
    if not nets or not in_networks(peer, nets):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, nets):
            return hop
    return peer


async def admit(request: Request, endpoint: str) -> None:
    """Admission of one request (see the module docstring); raises :class:`ApiError` to refuse.
    Sets ``request.state.key_id`` for the usage ledger."""
    request.state.key_id = None
    if endpoint in OPEN_ROUTES:
        return
    pipeline: Pipeline = request.app.state.pipeline
    cfg = pipeline.cfg
    if request.method in ("POST", "PUT", "PATCH"):
        limit = cfg.http.limits.max_body_bytes
        declared = request.headers.get("content-length")
        size = int(declared) if declared and declared.isdigit() else len(await request.body())
        if size > limit:
            METRICS.admission.labels("request_too_large").inc()
            raise ApiError(413, f"body: the request body is {size} bytes; the limit is {limit} "
                           "(http.limits.max_body_bytes)", param="body", code="request_too_large")
    if endpoint == "/metrics" and cfg.governor.auth.metrics_open:
        return
    token = bearer(request)
    try:
        verdict = await pipeline.govern(
            "admit", token, client_ip(request, cfg.http.trusted_proxies), endpoint,
            (request.method, endpoint) in ADMIN_ROUTES,
        )
    except StageError as e:
        if cfg.governor.auth.enabled:  # fail closed: no key can be checked
            raise ApiError(503, f"the governor is unavailable ({e.detail}); API keys cannot be checked, retry shortly",
                           type="service_unavailable", code="governor_unavailable",
                           headers={"Retry-After": "5"}) from None
        METRICS.admission.labels("governor_unavailable_open").inc()
        log.warning(f"governor unavailable, request admitted without limits (auth is off): {e}")
        return
    if not verdict.allowed:
        METRICS.admission.labels(verdict.code).inc()
        headers = {"Retry-After": str(max(1, math.ceil(verdict.retry_after)))} if verdict.status == 429 else {}
        if verdict.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        kind = {401: "invalid_request_error", 403: "permission_error", 429: (
            "insufficient_quota" if verdict.code == "insufficient_quota" else "rate_limit_error")}[verdict.status]
        raise ApiError(verdict.status, verdict.message, type=kind, code=verdict.code, headers=headers)
    request.state.key_id = verdict.key_id
    request.state.scope = verdict.scope


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
            t = time.perf_counter()
            try:
                await admit(request, endpoint)
                response = await inner(request)
            except Exception as e:
                status = (400 if isinstance(e, RequestValidationError) else e.status if isinstance(e, ApiError)
                          else getattr(e, "status_code", 500))
                METRICS.http_requests.labels(request.method, endpoint, str(status)).inc()
                raise
            METRICS.http_requests.labels(request.method, endpoint, str(response.status_code)).inc()
            if not isinstance(response, StreamingResponse):  # a stream is observed at its last byte
                METRICS.http_duration.labels(endpoint).observe(time.perf_counter() - t)
            return response

        return handler


app.router.route_class = ObservedRoute


# ---------------------------------------------------------------------------------------------
# the stages behind Serve handles


def _stage_error(stage: str, e: Exception) -> StageError:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(e, StageError):
        return e
    if isinstance(e, BackPressureError):
        return StageError(stage, "overloaded", "its queue is full")
    if isinstance(e, DeploymentUnavailableError):
        return StageError(stage, "unavailable", "no replica is running")
    name = type(e).__name__
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name:
        return StageError(stage, "unavailable", f"replica died ({name})")
    cause = getattr(e, "cause", None) or e
    return StageError(stage, "error", f"{type(cause).__name__}: {cause}".splitlines()[0][:300])


class HandleStages:
    def __init__(self, *, app_name: str, router, retriever, reranker, generator, governor) -> None:
        self.app_name = app_name
        self.router, self.retriever, self.reranker, self.generator = router, retriever, reranker, generator
        self.governor = governor
        self.rerank_enabled = reranker is not None

    async def route(self, messages: list[Message]) -> StageReply:
        try:
            route, replica = await self.router.route.remote(messages)
        except Exception as e:
            raise _stage_error("router", e) from None
        return StageReply(route, replica)

    async def retrieve(self, *, query: str, top_k: int, filters: Filters | None, strategy: str | None) -> StageReply:
        try:
            passages, replica, info = await self.retriever.search.remote(query, top_k, filters, strategy)
        except Exception as e:
            raise _stage_error("retriever", e) from None
        return StageReply(passages, replica, info)

    async def rerank(self, *, query: str, passages: list[Passage], top_k: int) -> StageReply:
        try:
            ranked, replica = await self.reranker.rerank.remote(query, passages, top_k)
        except Exception as e:
            raise _stage_error("reranker", e) from None
        return StageReply(ranked, replica)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[GenChunk]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        try:
            stream = self.generator.options(stream=True).chat.remote(ChatCompletionRequest(**request))
            async for batch in stream:
                for item in batch if isinstance(batch, list) else [batch]:
                    for chunk in _engine_chunks(item):
                        yield chunk
        except StageError:
            raise
        except Exception as e:
            raise _stage_error("generator", e) from None

    async def govern(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.governor, method).remote(*args)
        except Exception as e:
            raise _stage_error("governor", e) from None

    async def readiness(self) -> dict[str, str | None]:
        """Stage -> None when fine, else what is wrong. Every probe is bounded: a stage still
        starting must not hang the readiness check."""
        import asyncio

        problems: dict[str, str | None] = {}
        try:
            status = (await asyncio.wait_for(asyncio.to_thread(serve.status), 5)).applications.get(self.app_name)
            deployments = status.deployments if status else {}
            for name, d in deployments.items():
                state = str(getattr(d.status, "value", d.status))
                problems[name] = None if state == "HEALTHY" else f"{state}: {d.message}".strip(": ")
        except Exception as e:
            problems["serve"] = f"cannot read Serve status: {type(e).__name__} {e}".strip()
        try:
            info = await asyncio.wait_for(self.retriever.info.remote(), 3)
            problems["index"] = (
                None if info["version"] else f"no index loaded from {info['index_dir']}: {info['error']}; run `ragraph index`"
            )
        except asyncio.TimeoutError:
            problems["index"] = "unknown: the retriever did not answer within 3 s (starting?)"
        except Exception as e:
            problems["index"] = f"unknown: the retriever is not answering ({_stage_error('retriever', e).detail})"
        return problems


def _engine_chunks(item: Any) -> list[GenChunk]:
    """vLLM's OpenAI output (SSE strings, an ErrorResponse or a full response) -> GenChunks."""
    if isinstance(item, str):
        out = []
        for line in item.splitlines():
            line = line.strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                continue
            body = json.loads(data)
            if "error" in body and "choices" not in body:
                err = body["error"]
                raise StageError("generator", "error", str(err.get("message", err)))
            text, finish = "", None
            for c in body.get("choices") or []:
                text += (c.get("delta") or {}).get("content") or ""
                finish = c.get("finish_reason") or finish
            out.append(GenChunk(text, finish, body.get("usage")))
        return out
    body = item.model_dump() if hasattr(item, "model_dump") else item
    if isinstance(body, dict) and "error" in body and "choices" not in body:
        err = body["error"]
        code = err.get("code") if isinstance(err, dict) else None
        raise StageError("generator", "overloaded" if code == 503 else "error",
                         str(err.get("message", err)) if isinstance(err, dict) else str(err))
    if isinstance(body, dict) and "choices" in body:  # a non-streamed response
        c = body["choices"][0]
        return [GenChunk((c.get("message") or {}).get("content") or "", c.get("finish_reason"), body.get("usage"))]
    raise StageError("generator", "error", f"unexpected engine output {type(item).__name__}")


# ---------------------------------------------------------------------------------------------
# route bodies shared by the Serve ingress and the in-process app (serve/local.py)


def no_cache(request: Request) -> bool:
    return "no-cache" in request.headers.get("cache-control", "").lower()


async def chat_response(pipeline: Pipeline, body: ChatRequest, request: Request) -> Response:
    rid = request_id(request)
    t = time.perf_counter()
    prep = await pipeline.prepare(body, rid, key_id=getattr(request.state, "key_id", None),
                                  bypass_cache=no_cache(request))
    if not body.stream:
        result = await pipeline.chat_completion(body, prep)
        return JSONResponse(result, headers={"X-Request-ID": rid})
    events = pipeline.chat_events(body, prep)
    first = await anext(events)  # generation has started (or degraded, or raised a 503)

    async def replay() -> AsyncIterator[tuple[str, Any]]:
        yield first
        async for ev in events:
            yield ev

    async def body_iter() -> AsyncIterator[str]:
        try:
            async for line in pipeline.chat_stream(body, prep, replay()):
                yield line
        finally:
            METRICS.http_duration.labels("/v1/chat/completions").observe(time.perf_counter() - t)

    return StreamingResponse(
        body_iter(), media_type="text/event-stream",
        headers={"X-Request-ID": rid, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def search_response(pipeline: Pipeline, body: SearchRequest, request: Request) -> JSONResponse:
    rid = request_id(request)
    return JSONResponse(await pipeline.search(body, rid), headers={"X-Request-ID": rid})


async def ready_response(pipeline: Pipeline) -> JSONResponse:
    problems = await pipeline.stages.readiness()
    missing = {k: v for k, v in problems.items() if v}
    body = {"status": "ready" if not missing else "not_ready", "checks": {k: v or "ok" for k, v in problems.items()}}
    return JSONResponse(body, status_code=200 if not missing else 503, headers={} if not missing else {"Retry-After": "5"})


async def usage_response(pipeline: Pipeline, request: Request, key_id: str | None, all_keys: bool) -> dict:
    """The caller's token usage; an admin may ask for another key's (``key_id``) or every key's."""
    own = getattr(request.state, "key_id", None)
    if (key_id or all_keys) and getattr(request.state, "scope", None) != "admin":
        raise ApiError(403, "key_id and all need an admin key; without them you see your own usage",
                       type="permission_error", param="key_id" if key_id else "all", code="insufficient_scope")
    if all_keys:
        return await governor_call(pipeline, "usage", "all_usage")
    usage = await governor_call(pipeline, "usage", "usage", key_id or own)
    if usage is None:
        raise ApiError(404, f"no API key has id {key_id!r}; `ragraph keys list --all` shows them", param="key_id",
                       code="key_not_found")
    return {"object": "usage", **usage}


async def governor_call(pipeline: Pipeline, what: str, method: str, *args: Any) -> Any:
    """A governor call an endpoint cannot answer without: 503 + Retry-After once retries are spent."""
    try:
        return await pipeline.govern(method, *args)
    except StageError as e:
        raise ApiError(503, f"{what} is unavailable: {e.detail}", type="service_unavailable",
                       code="governor_unavailable", headers={"Retry-After": "5"}) from None


async def cache_call(pipeline: Pipeline, method: str) -> Any:
    return await governor_call(pipeline, "the response cache", method)


def models_list(pipeline: Pipeline) -> dict:
    return {
        "object": "list",
        "data": [{"id": pipeline.model, "object": "model", "created": 0, "owned_by": "ragraph",
                  "root": pipeline.cfg.models.location("generator")}],
    }


def model_card(pipeline: Pipeline, model_id: str) -> dict:
    if model_id != pipeline.model:
        raise ApiError(404, f"the model {model_id!r} does not exist; this service serves {pipeline.model!r}",
                       param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ragraph"}


# ---------------------------------------------------------------------------------------------
# the ingress


@serve.ingress(app)
class RagIngress:
    def __init__(self, cfg, router, retriever, reranker, generator, governor, app_name: str = "ragraph") -> None:
        stages = HandleStages(app_name=app_name, router=router, retriever=retriever, reranker=reranker,
                              generator=generator, governor=governor)
        self.cfg = cfg
        self.pipeline = Pipeline(cfg, stages, metrics=METRICS)
        self.pipeline.warm_up()
        app.state.pipeline = self.pipeline  # for admission in ObservedRoute (one ingress per process)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request) -> Response:
        return await chat_response(self.pipeline, body, request)

    @app.post("/v1/search")
    async def search(self, body: SearchRequest, request: Request) -> JSONResponse:
        return await search_response(self.pipeline, body, request)

    @app.get("/v1/models")
    async def models(self) -> dict:
        return models_list(self.pipeline)

    @app.get("/v1/usage")
    async def usage(self, request: Request, key_id: str | None = None,
                    all_keys: bool = Query(False, alias="all")) -> dict:
        return await usage_response(self.pipeline, request, key_id, all_keys)

    @app.get("/v1/cache/stats")
    async def cache_stats(self) -> dict:
        return await cache_call(self.pipeline, "cache_stats")

    @app.delete("/v1/cache")
    async def cache_clear(self) -> dict:
        return {"object": "cache.cleared", "removed": await cache_call(self.pipeline, "cache_clear")}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        return model_card(self.pipeline, model_id)

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        return await ready_response(self.pipeline)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(METRICS.render(), media_type="text/plain; version=0.0.4")
