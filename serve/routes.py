"""The HTTP routes, declared once: the Serve ingress (``serve.app``) and the in-process app
(``serve.local``) both serve :func:`make_app`'s FastAPI app, which reads its pipeline
(:class:`flow.pipeline.Pipeline`) from ``app.state.pipeline``.

Routes (each declared with its access level, :mod:`serve.routetable`): ``POST /v1/chat/completions``
(OpenAI-compatible, ``stream`` as SSE), ``POST /v1/search``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /v1/usage`` (user); ``GET /v1/cache/stats`` and ``DELETE /v1/cache``
(admin); ``GET /health``, ``GET /health/ready`` (public); ``GET /metrics`` (metrics); the API's
schema; and the tables of ``serve/documents.py``, ``serve/conversations.py``, ``serve/ui.py`` and
``serve/apidocs.py``. Every JSON route has a ``response_model`` (:mod:`serve.responses`); the chat
route streams ``text/event-stream`` when asked, ``/metrics`` is Prometheus text and the pages are
HTML (``response_class``). Every error is in OpenAI's format (``serve.errors``); nothing returns a
bare 500.

Every route's dependencies admit its request first (:mod:`serve.admission`: the access level's,
from the headers alone), then take the replica's queue slot (routed work) and read the body within
its limits; the route class (:class:`ObservedRoute`) counts and times every request, writes the
query log and releases a quota hold the request did not use.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from deployments.errors import StageError
from flow.calls import state_call
from flow.errors import FlowError
from flow.events import ChatEvent, Done
from flow.metrics import METRICS
from flow.openai import completion
from flow.pipeline import Pipeline
from flow.requests import ChatRequest, SearchRequest
from serve import openai
from serve.admission import ACCESS, CHAT, Access, Caller, bearer, caller, client_ip, is_local, receive, slot
from serve.apidocs import ROUTES as API_DOCS_ROUTES
from serve.conversations import ROUTES as HISTORY_ROUTES, check_conversation, recorded
from serve.documents import ROUTES as DOCUMENT_ROUTES
from serve.errors import install, status_of
from serve.ids import id_headers, request_id
from serve.querylog import QueryLog, note, question_of
from serve.responses import (CacheCleared, CacheStats, ChatCompletion, ErrorResponse, Health, ModelCard, ModelList,
                             Readiness, SearchResponse, UsageList, UsageReport)
from serve.routetable import ADMIN, BODIES, METRICS as METRICS_ACCESS, PUBLIC, USER, RouteTable, json_body
from serve.ui import ROUTES as PAGE_ROUTES

log = logging.getLogger("ray.serve")
TITLE = "ragraph"
VERSION = "0.1.0"
DESCRIPTION = "Retrieval-augmented chat on a Ray Serve graph: router -> hybrid retriever -> reranker -> vLLM."
ROUTES = RouteTable()  # the routes declared here (below)


class ObservedRoute(APIRoute):
    """Counts and times every routed request (``rag_http_requests_total``, ``..._duration_seconds``)
    and writes its query-log line (not for public routes or ``/metrics``).

    A route class, not an ``@app.middleware``: Ray Serve's class-based ingress does not run the
    app's HTTP middleware (measured on Ray 2.60: the counter stayed at 0), but it does run the
    route's handler. Errors are counted with the status their exception handler will give them."""

    @property
    def access(self) -> str:
        """The route's access level: its :class:`serve.admission.Access` dependency's."""
        return next(d.dependency.level for d in self.dependencies if isinstance(d.dependency, Access))

    def get_route_handler(self):
        inner = super().get_route_handler()
        endpoint = self.path
        logged = self.access not in (PUBLIC, METRICS_ACCESS)

        async def handler(request: Request) -> Response:
            t = request.state.started = time.perf_counter()
            response = None
            try:
                response = await inner(request)  # its dependencies admit it first: no body byte is read before
            except Exception as e:
                METRICS.http_requests.labels(request.method, endpoint, str(status_of(e))).inc()
                if logged:
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
                if logged:
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
    """Write this request's query-log line (the route class writes none for probes or /metrics).
    Never raises."""
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


async def chat_response(pipeline: Pipeline, body: ChatRequest, request: Request, response: Response) -> Any:
    rid = request_id(request)
    t = time.perf_counter()
    await check_conversation(request, body)  # rag.conversation_id: 404 before any work
    prep = await pipeline.prepare(body, rid, key_id=getattr(request.state, "key_id", None),
                                  reservation=getattr(request.state, "reservation", None),
                                  bypass_cache=no_cache(request))
    note(request, trace=prep.trace, question=question_of(body))  # the query log (serve/querylog.py)
    if not body.stream:
        result = await completion(recorded(request, body, pipeline.chat_events(body, prep)), request_id=rid,
                                  model=pipeline.model)
        note(request, rag=result.get("rag"), usage=result.get("usage"))
        response.headers.update(id_headers(request))
        return result
    events = recorded(request, body, pipeline.chat_events(body, prep))  # the answered request id, the turn
    first = await anext(events)  # generation has started (or degraded, or raised)

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
            METRICS.http_duration.labels(CHAT).observe(time.perf_counter() - t)
            log_query(request, CHAT, 200)  # at the stream's last byte (or when the client left)

    return StreamingResponse(
        body_iter(), media_type="text/event-stream",
        headers={**id_headers(request), "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def ready_response(pipeline: Pipeline, request: Request, response: Response) -> dict:
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
    if missing:
        response.status_code = 503
        response.headers["Retry-After"] = "5"
    return {"status": "ready" if not missing else "not_ready", "checks": checks}


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


async def usage_response(pipeline: Pipeline, who: Caller, key_id: str | None, all_keys: bool) -> dict:
    """The caller's token usage; an admin may ask for another key's (``key_id``) or every key's."""
    if (key_id or all_keys) and who.scope != "admin":
        raise FlowError("forbidden", "key_id and all need an admin key; without them you see your own usage",
                        param="key_id" if key_id else "all", code="insufficient_scope")
    if all_keys:
        return await state_call(pipeline, "usage", pipeline.governor.all_usage)
    usage = await state_call(pipeline, "usage", pipeline.governor.usage, key_id or who.key_id)
    if usage is None:
        raise FlowError("not_found", f"no API key has id {key_id!r}; `ragraph keys list --all` shows them",
                        param="key_id", code="key_not_found")
    return {"object": "usage", **usage}


def models_list(pipeline: Pipeline) -> dict:
    return {
        "object": "list",
        "data": [{"id": pipeline.model, "object": "model", "created": 0, "owned_by": "ragraph",
                  "root": pipeline.cfg.models.generator.name}],  # the model's name, never its folder here
    }


def model_card(pipeline: Pipeline, model_id: str) -> dict:
    if model_id != pipeline.model:
        raise FlowError("not_found", f"the model {model_id!r} does not exist; this service serves {pipeline.model!r}",
                        param="model", code="model_not_found")
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "ragraph"}


# ---------------------------------------------------------------------------------------------
# the routes


def pipeline_of(request: Request) -> Pipeline:
    return request.app.state.pipeline


STREAM = {200: {"description": "The answer: a `chat.completion`, or with `stream: true` server-sent events (each "
                "`data:` line a `chat.completion.chunk`, the last with `rag`, then `data: [DONE]`).",
                "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@ROUTES.post(CHAT, access=USER, response_model=ChatCompletion, responses=STREAM)
async def chat(request: Request, response: Response, body: ChatRequest = json_body(ChatRequest)) -> Any:
    return await chat_response(pipeline_of(request), body, request, response)


@ROUTES.post("/v1/search", access=USER, response_model=SearchResponse)
async def search(request: Request, response: Response, body: SearchRequest = json_body(SearchRequest)) -> dict:
    pipeline = pipeline_of(request)
    note(request, question=body.query, strategy=body.strategy or pipeline.cfg.retriever.strategy)
    result = await pipeline.search(body, request_id(request))
    note(request, search=result)
    response.headers.update(id_headers(request))
    return result


@ROUTES.get("/v1/models", access=USER, response_model=ModelList)
async def models(request: Request) -> dict:
    return models_list(pipeline_of(request))


@ROUTES.get("/v1/usage", access=USER, response_model=UsageReport | UsageList)
async def usage(request: Request, who: Caller = Depends(caller), key_id: str | None = None,
                all_keys: bool = Query(False, alias="all")) -> dict:
    return await usage_response(pipeline_of(request), who, key_id, all_keys)


@ROUTES.get("/v1/cache/stats", access=ADMIN, response_model=CacheStats)
async def cache_stats(request: Request) -> dict:
    pipeline = pipeline_of(request)
    return await state_call(pipeline, "the response cache", pipeline.governor.cache_stats)


@ROUTES.delete("/v1/cache", access=ADMIN, response_model=CacheCleared)
async def cache_clear(request: Request) -> dict:
    pipeline = pipeline_of(request)
    return {"object": "cache.cleared",
            "removed": await state_call(pipeline, "the response cache", pipeline.governor.cache_clear)}


@ROUTES.get("/v1/models/{model_id:path}", access=USER, response_model=ModelCard)
async def model(model_id: str, request: Request) -> dict:
    return model_card(pipeline_of(request), model_id)


@ROUTES.get("/health", access=PUBLIC, response_model=Health)
async def health() -> dict:
    return {"status": "ok"}


@ROUTES.get("/health/ready", access=PUBLIC, response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready (with Retry-After)."}})
async def ready(request: Request, response: Response) -> dict:
    return await ready_response(pipeline_of(request), request, response)


@ROUTES.get("/metrics", access=METRICS_ACCESS, response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    METRICS.saw_published(pipeline_of(request).cfg.indexing.dir)  # for the IndexNotReloaded alert
    return Response(METRICS.render(), media_type="text/plain; version=0.0.4")


# The API's own documentation, admitted like every other route: behind the key when auth is on (the
# /docs and /redoc pages, with their pinned files and CSP, are serve/apidocs.py's).
@ROUTES.get("/openapi.json", access=USER, include_in_schema=False, response_model=dict[str, Any])
async def openapi_schema(request: Request) -> dict:
    return request.app.openapi()


TABLES = (ROUTES, DOCUMENT_ROUTES, HISTORY_ROUTES, PAGE_ROUTES, API_DOCS_ROUTES)
ERRORS = {"default": {"model": ErrorResponse, "description": "An error in OpenAI's format."}}


def dependencies(level: str) -> list[Any]:
    """A route's dependencies, in order: admission to its level; the queue slot (routed work, not
    probes nor scrapes); the body, read within its limits."""
    slotted = level in (USER, ADMIN)
    return [Depends(ACCESS[level]), *([Depends(slot, scope="function")] if slotted else []), Depends(receive)]


router = APIRouter(route_class=ObservedRoute)
for _table in TABLES:
    # the routes here; the documents API and index operations; conversations and feedback; the chat
    # page; the API documentation pages
    for _path, _methods, _endpoint, _options in _table.routes:
        _level = _table.access[(_methods[0], _path)]
        _documented = _options.get("include_in_schema", True)
        _extra = {"responses": {**ERRORS, **_options.get("responses", {})}} if _documented else {}
        router.add_api_route(_path, _endpoint, methods=_methods, dependencies=dependencies(_level),
                             **{**_options, **_extra})
ACCESS_OF: dict[tuple[str, str], str] = {k: v for table in TABLES for k, v in table.access.items()}


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of ``app``, with the JSON bodies that routes read after admission
    (:func:`serve.routetable.json_body`) among its components."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # FastAPI's own (kept as app.openapi_schema)
        _, defs = models_json_schema([(m, "validation") for m in BODIES.values()],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema


def make_app(**kw: Any) -> FastAPI:
    """A FastAPI app with every route and error handler; set ``app.state.pipeline`` before serving.
    The documentation routes are :data:`router`'s own (admitted), not FastAPI's open ones."""
    kw = {"docs_url": None, "redoc_url": None, "openapi_url": None, **kw}
    app = FastAPI(title=TITLE, version=VERSION, description=DESCRIPTION, **kw)
    install(app, on_unexpected=lambda: METRICS.errors.labels("ingress", "error").inc())
    app.include_router(router)
    app.openapi = functools.partial(openapi, app)
    return app
