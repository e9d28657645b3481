"""The RAG pipeline the ingress runs: route -> retrieve -> rerank -> prompt -> generate.

It talks to the stages through a :class:`Stages` object: Serve deployment handles in the graph
(``serve/app.py``), or the plain classes called in-process (``serve/local.py``). It owns what
happens when a stage fails:

* router fails      -> the last user message is the query, hybrid strategy; flagged ``router``;
* retriever fails   -> no context; flagged ``retriever``;
* reranker fails    -> retrieval order kept; flagged ``reranker``;
* generator fails   -> with sources: a sources-only answer (``status: sources_only``); without
  sources: 503. A generator refusing work because its queue is full is a 503 with
  ``Retry-After`` (backpressure), never a silent degradation.

Resilience: every stage call has a timeout; the idempotent ones (router, retriever, reranker and
the governor) are retried with exponential backoff and jitter when a replica is lost or errs
(``http.retries``); the generator sits behind a circuit breaker (``http.breaker``). Answers of
deterministic requests are cached by the governor, keyed by the conversation, the RAG options,
the model, the sampling settings and the index version that answered, so a new index never
serves an old answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from deployments.generator import CitationFilter, Prompt, PromptBuilder, PromptTooLong, attribute
from deployments.retriever import Filters, Passage
from deployments.router import Message, Route
from serve.api import ApiError, ChatRequest, SearchRequest
from serve.breaker import OPEN, CircuitBreaker
from serve.cache import cache_key
from serve.metrics import Metrics

log = logging.getLogger("ray.serve")
RETRIED_KINDS = ("unavailable", "error", "stalled")  # a lost, failed or silent replica; never backpressure or a timeout


class StageError(Exception):
    """A stage call failed. ``kind``: overloaded | unavailable | timeout | stalled | error."""

    def __init__(self, stage: str, kind: str, detail: str) -> None:
        super().__init__(f"{stage} {kind}: {detail}")
        self.stage, self.kind, self.detail = stage, kind, detail


@dataclass(frozen=True, slots=True)
class StageReply:
    value: Any
    replica: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GenChunk:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class Stages(Protocol):
    rerank_enabled: bool

    async def route(self, messages: list[Message]) -> StageReply: ...
    async def retrieve(
        self, *, query: str, top_k: int, filters: Filters | None, strategy: str | None
    ) -> StageReply: ...  # value: list[Passage]; info: version, embed_ms, search_ms
    async def rerank(self, *, query: str, passages: list[Passage], top_k: int) -> StageReply: ...
    def generate(self, request: dict[str, Any]) -> AsyncIterator[GenChunk]: ...
    async def readiness(self) -> dict[str, str | None]: ...
    async def govern(self, method: str, *args: Any) -> Any: ...  # a call to the governor stage


@dataclass
class Trace:
    request_id: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, str] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    version: str | None = None
    route: Route | None = None
    t0: float = field(default_factory=time.perf_counter)

    def degrade(self, stage: str, why: str) -> None:
        if stage not in self.degraded:
            self.degraded.append(stage)
        self.reasons[stage] = why


@dataclass
class Prepared:
    trace: Trace
    prompt: Prompt
    rag: bool
    sources: list[Passage]
    key_id: str | None = None  # the API key that asked (None: auth off), for the usage ledger
    cache_key: str | None = None  # None: this answer is neither looked up nor stored


def excerpt(text: str, n: int = 240) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1].rsplit(" ", 1)[0] + "…"


class Pipeline:
    def __init__(self, cfg, stages: Stages, *, metrics: Metrics | None = None, prompt: PromptBuilder | None = None):
        self.cfg, self.stages = cfg, stages
        self.metrics = metrics or Metrics()
        self.prompt = prompt or PromptBuilder.from_config(cfg)
        self.model = cfg.generator.served_model_name
        self.timeouts = cfg.http.timeouts
        self.retry = cfg.http.retries
        self.limits = cfg.http.limits
        self.cache_enabled = cfg.governor.cache.enabled
        b = cfg.http.breaker
        self.breaker = CircuitBreaker(
            failure_threshold=b.failure_threshold, reset_timeout_s=b.reset_timeout_s,
            on_change=self.metrics.breaker_state.set,
        ) if b.enabled else None
        self.metrics.breaker_state.set(0)
        self._background: set[asyncio.Task] = set()

    def warm_up(self) -> None:
        self.prompt.warm_up()

    # -----------------------------------------------------------------------------------------
    # stage calls, timed and counted

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff before try ``attempt + 1`` (``attempt`` >= 1)."""
        r = self.retry
        return random.uniform(0, min(r.max_backoff_s, r.backoff_s * 2 ** (attempt - 1)))

    async def retrying(self, stage: str, make: Callable[[], Awaitable[Any]], timeout: float, *,
                       attempts: int | None = None, on_retry: Callable[[], None] | None = None) -> Any:
        """``await make()`` within ``timeout`` per try, retried on a lost replica or an error; with
        ``http.retries.attempt_timeout_s``, every try but the last is cut short after that long and
        retried (a replica on a dead node that Ray has not declared dead yet answers nothing).
        Raises :class:`StageError` with the last failure."""
        m = self.metrics
        attempts = attempts or self.retry.attempts
        cut = self.retry.attempt_timeout_s
        for attempt in range(1, attempts + 1):
            limit = min(cut, timeout) if cut and attempt < attempts else timeout
            try:
                return await asyncio.wait_for(make(), limit)
            except asyncio.TimeoutError:
                err = (StageError(stage, "stalled", f"no answer in {limit:g} s (http.retries.attempt_timeout_s)")
                       if limit < timeout else StageError(stage, "timeout", f"no answer in {timeout:g} s"))
            except StageError as e:
                err = e
            except Exception as e:  # a stage bug must not become a bare 500
                err = StageError(stage, "error", f"{type(e).__name__}: {e}")
            m.errors.labels(stage, err.kind).inc()
            if err.kind not in RETRIED_KINDS or attempt == attempts:
                raise err
            m.retries.labels(stage).inc()
            if on_retry is not None:
                on_retry()
            await asyncio.sleep(self.backoff(attempt))
        raise AssertionError("unreachable")

    async def _call(self, stage: str, trace: Trace, make: Callable[[], Awaitable[StageReply]], timeout: float) -> StageReply:
        m = self.metrics
        m.stage_inflight.labels(stage).inc()
        t = time.perf_counter()

        def retried() -> None:
            trace.retries[stage] = trace.retries.get(stage, 0) + 1

        try:
            reply = await self.retrying(stage, make, timeout, on_retry=retried)
        finally:
            m.stage_inflight.labels(stage).dec()
            took = time.perf_counter() - t
            m.stage_duration.labels(stage).observe(took)
            trace.timings_ms[stage] = round(took * 1000, 2)
        m.stage_requests.labels(stage, reply.replica or "local").inc()
        if reply.replica:
            trace.replicas[stage] = reply.replica
        return reply

    async def govern(self, method: str, *args: Any, attempts: int | None = None) -> Any:
        """A governor call (admission, usage, cache), retried like the other idempotent stages."""
        t = time.perf_counter()
        try:
            return await self.retrying(
                "governor", lambda: self.stages.govern(method, *args), self.timeouts.governor, attempts=attempts
            )
        finally:
            self.metrics.stage_duration.labels("governor").observe(time.perf_counter() - t)

    def record_usage(self, key_id: str | None, prompt_tokens: int, completion_tokens: int) -> None:
        """Write usage to the ledger in the background, retrying for about a minute so that a
        governor restart does not lose the record; a record that still fails is logged."""

        async def write() -> None:
            try:
                await self.govern("record", key_id, prompt_tokens, completion_tokens,
                                  attempts=max(self.retry.attempts, 8))
            except StageError as e:
                self.metrics.usage_lost.inc()
                log.error(f"usage of key {key_id or 'anonymous'} not recorded "
                          f"({prompt_tokens}+{completion_tokens} tokens): {e}")

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background usage writes (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def _retrieve(
        self, trace: Trace, *, query: str, top_k: int, filters: Filters | None, strategy: str | None, rerank: bool
    ) -> list[Passage]:
        want = max(top_k, self.cfg.reranker.candidates) if rerank else top_k
        try:
            got = await self._call(
                "retriever", trace,
                lambda: self.stages.retrieve(query=query, top_k=want, filters=filters, strategy=strategy),
                self.timeouts.retriever,
            )
        except StageError as e:
            trace.degrade("retriever", e.detail if e.kind != "error" else str(e))
            return []
        self.metrics.retrieval_duration.observe(trace.timings_ms["retriever"] / 1000)
        trace.version = got.info.get("version")
        self.metrics.saw_version(trace.version)
        for k in ("embed_ms", "search_ms", "batch_size"):
            if k in got.info:
                trace.timings_ms[f"retriever.{k.removesuffix('_ms')}"] = got.info[k]
        passages: list[Passage] = got.value
        if rerank and passages:
            try:
                rr = await self._call(
                    "reranker", trace, lambda: self.stages.rerank(query=query, passages=passages, top_k=top_k),
                    self.timeouts.reranker,
                )
                passages = rr.value
            except StageError as e:
                trace.degrade("reranker", e.detail)
        return passages[:top_k]

    def _filters(self, req_filters, route: Route | None) -> Filters | None:
        domains = None
        after = before = None
        if req_filters is not None:
            domains = tuple(req_filters.domains) if req_filters.domains else None
            after, before = req_filters.updated_after, req_filters.updated_before
        if domains is None and route is not None and route.domains:
            domains = route.domains
        try:
            f = Filters(domains=domains, updated_after=after, updated_before=before)
        except ValueError as e:
            raise ApiError(400, str(e), param="rag.filters") from None
        return f if f.active else None

    def _top_k(self, asked: int | None, param: str) -> int:
        k = asked or self.cfg.retriever.top_k
        limit = self.cfg.retriever.max_top_k
        if k > limit:
            raise ApiError(400, f"{param} must be <= {limit}, got {k}", param=param, code="invalid_value")
        return k

    def _use_rerank(self, asked: bool | None) -> bool:
        want = self.stages.rerank_enabled if asked is None else asked
        if want and not self.stages.rerank_enabled:
            raise ApiError(400, "rerank was requested but this service runs no reranker (reranker.enabled: false)",
                           param="rerank")
        return want

    # -----------------------------------------------------------------------------------------
    # /v1/search

    def check_input(self, req: ChatRequest | SearchRequest) -> None:
        """The configured size limits (``http.limits``): a 400 naming the field and the limit."""
        lim = self.limits

        def refuse(param: str, what: str, limit: int, got: int, key: str) -> None:
            raise ApiError(400, f"{param}: {what} at most {limit} (http.limits.{key}), got {got}",
                           param=param, code="limit_exceeded")

        if isinstance(req, SearchRequest):
            if len(req.query) > lim.max_query_chars:
                refuse("query", "characters:", lim.max_query_chars, len(req.query), "max_query_chars")
            return
        if len(req.messages) > lim.max_messages:
            refuse("messages", "messages:", lim.max_messages, len(req.messages), "max_messages")
        for i, m in enumerate(req.messages):
            if len(m.text) > lim.max_message_chars:
                refuse(f"messages[{i}].content", "characters:", lim.max_message_chars, len(m.text), "max_message_chars")

    async def search(self, req: SearchRequest, request_id: str) -> dict[str, Any]:
        self.check_input(req)
        trace = Trace(request_id)
        top_k = self._top_k(req.top_k, "top_k")
        rerank = self._use_rerank(req.rerank)
        filters = self._filters(req.filters, None)
        passages = await self._retrieve(
            trace, query=req.query, top_k=top_k, filters=filters, strategy=req.strategy, rerank=rerank
        )
        if "retriever" in trace.degraded:
            raise ApiError(503, f"retrieval is unavailable: {trace.reasons['retriever']}", type="service_unavailable",
                           code="stage_unavailable", headers={"Retry-After": "5"})
        trace.timings_ms["total"] = round((time.perf_counter() - trace.t0) * 1000, 2)
        return {
            "object": "search.results",
            "query": req.query,
            "results": [
                {
                    "rank": i + 1, "chunk_id": p.id, "document_id": p.document_id, "title": p.title,
                    "heading_path": p.heading_path, "source": p.source, "domain": p.domain,
                    "excerpt": excerpt(p.text), "text": p.text, "relevance_score": p.score, "scores": p.scores,
                }
                for i, p in enumerate(passages)
            ],
            "metadata": self._meta(trace, status="ok" if not trace.degraded else "degraded"),
        }

    # -----------------------------------------------------------------------------------------
    # /v1/chat/completions

    def check_model(self, req: ChatRequest) -> None:
        if req.model != self.model:
            raise ApiError(
                404, f"the model {req.model!r} does not exist; this service serves {self.model!r} (GET /v1/models)",
                param="model", code="model_not_found",
            )

    def answer_tokens(self, req: ChatRequest) -> int:
        g = self.cfg.generator
        n = req.answer_tokens or g.max_tokens
        if n > g.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise ApiError(400, f"{param} must be <= {g.max_tokens_limit}, got {n}", param=param, code="invalid_value")
        return n

    def sampling(self, req: ChatRequest) -> dict[str, Any]:
        g = self.cfg.generator
        return {
            "max_tokens": self.answer_tokens(req),
            "temperature": g.temperature if req.temperature is None else req.temperature,
            **{k: getattr(req, k) for k in ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
               if getattr(req, k) is not None},
        }

    def cacheable(self, req: ChatRequest, sampling: dict[str, Any], bypass: bool) -> bool:
        """Only answers that would come out the same again: greedy decoding or a fixed seed."""
        return self.cache_enabled and not bypass and req.rag.cache and (
            sampling["temperature"] == 0 or sampling.get("seed") is not None
        )

    async def prepare(self, req: ChatRequest, request_id: str, *, key_id: str | None = None,
                      bypass_cache: bool = False) -> Prepared:
        self.check_model(req)
        self.check_input(req)
        max_tokens = self.answer_tokens(req)
        top_k = self._top_k(req.rag.top_k, "rag.top_k")
        rerank = self._use_rerank(req.rag.rerank)
        trace = Trace(request_id)
        messages = [Message("system" if m.role == "developer" else m.role, m.text) for m in req.messages]
        sources: list[Passage] = []
        rag = req.rag.enabled
        if rag:
            try:
                route = (await self._call("router", trace, lambda: self.stages.route(messages), self.timeouts.router)).value
            except StageError as e:
                trace.degrade("router", e.detail)
                route = Route(kind="rag", query=messages[-1].content, reasons=("router unavailable",))
            trace.route = route
            if route.kind == "rag":
                filters = self._filters(req.rag.filters, route)
                strategy = req.rag.strategy or (route.strategy if route.strategy != "none" else None)
                sources = await self._retrieve(
                    trace, query=route.query, top_k=top_k, filters=filters, strategy=strategy, rerank=rerank
                )
        t = time.perf_counter()
        try:
            prompt = self.prompt.build(messages=messages, passages=sources, max_tokens=max_tokens)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        trace.timings_ms["prompt"] = round((time.perf_counter() - t) * 1000, 2)
        key = None
        sampling = self.sampling(req)
        if self.cacheable(req, sampling, bypass_cache) and not trace.degraded:
            key = cache_key(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                rag=req.rag.model_dump(mode="json", exclude={"cache"}), model=self.model,
                index_version=trace.version, sampling=sampling,
            )
        return Prepared(trace, prompt, rag, prompt.sources, key_id=key_id, cache_key=key)

    def engine_request(self, req: ChatRequest, prep: Prepared) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": prep.prompt.messages,
            **self.sampling(req),
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def start_generation(self, req: ChatRequest, prep: Prepared) -> tuple[AsyncIterator[GenChunk] | None, GenChunk | None]:
        """Start the engine and wait for its first chunk, so that a refusal (queue full) or an
        outage is known before any byte goes to the client. Returns (stream, first chunk), or
        (None, None) when the answer degrades to sources only. Raises ApiError(503) when there is
        nothing to degrade to, or when the generator is overloaded."""
        trace = prep.trace
        m = self.metrics
        if self.breaker is not None and not self.breaker.allow():
            return self._generator_down(prep, StageError("generator", "unavailable", self.breaker.describe()))
        stream = self.stages.generate(self.engine_request(req, prep))
        m.stage_inflight.labels("generator").inc()
        t = time.perf_counter()
        try:
            first = await asyncio.wait_for(anext(stream), self.timeouts.generator_first_token)
        except StopAsyncIteration:
            first = GenChunk(finish_reason="stop")
        except Exception as e:
            err = e if isinstance(e, StageError) else (
                StageError("generator", "timeout", f"no first token in {self.timeouts.generator_first_token:g} s")
                if isinstance(e, asyncio.TimeoutError) else StageError("generator", "error", f"{type(e).__name__}: {e}")
            )
            m.errors.labels("generator", err.kind).inc()
            await _close(stream)
            if self.breaker is not None:  # a full queue is a live generator saying "not now"
                self.breaker.success() if err.kind == "overloaded" else self.breaker.failure()
            if err.kind == "overloaded":
                raise ApiError(503, f"the generator is at capacity ({err.detail}); retry shortly",
                               type="service_unavailable", code="overloaded", headers={"Retry-After": "2"}) from None
            return self._generator_down(prep, err)
        except BaseException:  # cancelled (the client went away): no verdict on the generator
            if self.breaker is not None:
                self.breaker.release()
            await _close(stream)
            raise
        finally:
            m.stage_inflight.labels("generator").dec()
        if self.breaker is not None:
            self.breaker.success()
        ttft = time.perf_counter() - t
        m.ttft.observe(ttft)
        trace.timings_ms["generator.first_token"] = round(ttft * 1000, 2)
        return stream, first

    def _generator_down(self, prep: Prepared, err: StageError) -> tuple[None, None]:
        """No generator: a sources-only answer, or a 503 when there is nothing to show."""
        if not prep.sources:
            wait = self.breaker.retry_in() if self.breaker is not None and self.breaker.state == OPEN else 10
            raise ApiError(503, f"the generator is unavailable ({err.detail}) and there are no sources to show",
                           type="service_unavailable", code="generator_unavailable",
                           headers={"Retry-After": str(max(1, round(wait)))})
        prep.trace.degrade("generator", err.detail)
        self.metrics.degraded.labels("generator").inc()
        return None, None

    def sources_only_text(self, prep: Prepared) -> str:
        lines = [
            "The answer generator is unavailable right now, so no answer was written. "
            "These are the most relevant sources for your question:"
        ]
        for i, p in enumerate(prep.sources, 1):
            lines.append(f"[{i}] {p.title or p.document_id}: {excerpt(p.text, 160)}")
        return "\n".join(lines)

    async def chat_events(self, req: ChatRequest, prep: Prepared) -> AsyncIterator[tuple[str, Any]]:
        """("delta", text)... then ("done", (finish_reason, usage, rag)). Generation is started by
        the caller-visible :meth:`start_generation` (inside this generator)."""
        if prep.cache_key is not None:
            hit = await self._cache("cache_get", prep.cache_key)
            self.metrics.cache_requests.labels("hit" if hit else "miss").inc()
            if hit:
                yield "delta", hit["text"]
                rag = {"sources": hit["sources"], "metadata": {
                    **self._meta(prep.trace, status="ok", usage=hit["usage"], prep=prep, cached=True),
                    "citations": hit["citations"], "cached_request_id": hit["request_id"]}}
                yield "done", (hit["finish"], dict(hit["usage"]), rag)
                return
        else:
            self.metrics.cache_requests.labels("skip").inc()
        stream, first = await self.start_generation(req, prep)
        trace = prep.trace
        sent: list[str] = []
        cites = CitationFilter(len(prep.sources))
        citations = "model"
        usage = {"prompt_tokens": prep.prompt.prompt_tokens, "completion_tokens": 0}
        finish = "stop"
        if stream is None:
            text = self.sources_only_text(prep)
            cites.apply(text)
            citations = "listed"
            sent.append(text)
            yield "delta", text
            status = "sources_only"
        else:
            t = time.perf_counter()
            chunk: GenChunk | None = first
            answer: list[str] = []
            try:
                while chunk is not None:
                    if chunk.text:
                        out = cites.feed(chunk.text)
                        if out:
                            answer.append(out)
                            sent.append(out)
                            yield "delta", out
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                    if chunk.usage:
                        usage = {k: int(chunk.usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")}
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        chunk = None
            except Exception as e:  # mid-stream failure: keep what was sent, say so
                self.metrics.errors.labels("generator", "error").inc()
                trace.degrade("generator", f"stream broke after the first token: {type(e).__name__}: {e}")
                finish = "error"
            finally:
                await _close(stream)
            tail = cites.flush()
            answer.append(tail)
            if not cites.cited and finish != "error":
                found = attribute("".join(answer), prep.sources)
                if found:
                    cites.cited = found
                    citations = "attributed"
                    tail += " [" + ", ".join(str(n) for n in sorted(found)) + "]"
            if tail:
                sent.append(tail)
                yield "delta", tail
            took = time.perf_counter() - t
            self.metrics.generation_duration.observe(took)
            trace.timings_ms["generator"] = round(took * 1000 + trace.timings_ms.get("generator.first_token", 0), 2)
            status = "ok" if not trace.degraded else "degraded"
        if stream is not None:  # a sources-only answer sent nothing through the generator
            self.metrics.generation_tokens.labels("prompt").inc(usage["prompt_tokens"])
            self.metrics.generation_tokens.labels("completion").inc(usage["completion_tokens"])
            self.record_usage(prep.key_id, usage["prompt_tokens"], usage["completion_tokens"])
        for stage in trace.degraded:
            if stage != "generator":
                self.metrics.degraded.labels(stage).inc()
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        trace.timings_ms["total"] = round((time.perf_counter() - trace.t0) * 1000, 2)
        rag = {
            "sources": [
                {
                    "index": i, "document_id": p.document_id, "chunk_id": p.id, "title": p.title,
                    "heading_path": p.heading_path, "excerpt": excerpt(p.text), "relevance_score": p.score,
                    "source": p.source, "domain": p.domain, "cited": i in cites.cited,
                }
                for i, p in enumerate(prep.sources, 1)
            ],
            "metadata": {**self._meta(trace, status=status, usage=usage, prep=prep),
                         "citations": citations if cites.cited else "none"},
        }
        if prep.cache_key is not None and status == "ok" and finish in ("stop", "length"):
            await self._cache("cache_put", prep.cache_key, {
                "text": "".join(sent), "finish": finish, "usage": dict(usage), "sources": rag["sources"],
                "citations": rag["metadata"]["citations"], "request_id": trace.request_id,
            })
        yield "done", (finish, usage, rag)

    async def _cache(self, method: str, *args: Any) -> Any:
        """A cache call; the cache is an optimisation, so a failure is a miss (counted), not an error."""
        try:
            return await self.govern(method, *args, attempts=1)
        except StageError as e:
            self.metrics.cache_requests.labels("error").inc()
            log.warning(f"response cache {method} failed: {e}")
            return None

    def _meta(self, trace: Trace, *, status: str, usage: dict | None = None, prep: Prepared | None = None,
              cached: bool = False) -> dict:
        meta: dict[str, Any] = {
            "request_id": trace.request_id,
            "model": self.model,
            "index_version": trace.version,
            "cached": cached,
            "status": status,
            "degraded": list(trace.degraded),
            "degraded_reasons": dict(trace.reasons),
            "timings_ms": dict(trace.timings_ms),
            "replicas": dict(trace.replicas),
            "retries": dict(trace.retries),
        }
        if trace.route is not None:
            r = trace.route
            meta["route"] = {"kind": r.kind, "query": r.query, "strategy": r.strategy,
                             "domains": list(r.domains) if r.domains else None, "reasons": list(r.reasons)}
        if prep is not None:
            meta["rag"] = prep.rag
            meta["context_tokens"] = prep.prompt.context_tokens
            meta["dropped_turns"] = prep.prompt.dropped_turns
        if usage is not None:
            meta["tokens"] = dict(usage)
        return meta

    # -----------------------------------------------------------------------------------------
    # OpenAI response shapes

    async def chat_completion(self, req: ChatRequest, prep: Prepared) -> dict[str, Any]:
        parts: list[str] = []
        done: Any = None
        async for kind, value in self.chat_events(req, prep):
            if kind == "delta":
                parts.append(value)
            else:
                done = value
        finish, usage, rag = done
        return {
            "id": f"chatcmpl-{prep.trace.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage,
            "rag": rag,
        }

    async def chat_stream(self, req: ChatRequest, prep: Prepared, events: AsyncIterator[tuple[str, Any]]) -> AsyncIterator[str]:
        """SSE lines in OpenAI's chunk format; the last data chunk carries ``rag``."""
        cid, created = f"chatcmpl-{prep.trace.request_id}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in events:
            if kind == "delta":
                yield chunk({"content": value})
                continue
            finish, usage, rag = value
            if req.stream_options and req.stream_options.include_usage:
                yield chunk({}, finish)
                body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model,
                        "choices": [], "usage": usage, "rag": rag}
                yield f"data: {json.dumps(body)}\n\n"
            else:
                yield chunk({}, finish, rag=rag)
        yield "data: [DONE]\n\n"


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass


def new_request_id() -> str:
    return uuid.uuid4().hex
