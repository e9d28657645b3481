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
the state calls) are retried with exponential backoff and jitter when a replica is lost or errs
(``http.retries``); the generator sits behind a circuit breaker (``http.breaker``). Answers of
deterministic requests are cached (``governor.cache``), keyed by the conversation, the RAG options,
the model, the sampling settings and the index version that answered, so a new index never
serves an old answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import PureWindowsPath
from typing import Any

from deployments.admission import Admission
from deployments.cache import cache_key, hit_request_id
from deployments.errors import StageError, from_exception
from deployments.engine import EXTENSIONS
from deployments.generator import GenDelta, GenRequest
from deployments.governor import Governor
from deployments.ingest import IngestService
from deployments.retriever import Filters, Passage
from deployments.router import Message, Route
from serve.api import ChatRequest, SearchRequest
from serve.breaker import OPEN
from serve.calls import StageCalls, Stages
from serve.errors import ApiError, stage_unavailable
from serve.events import ChatEvent, Delta, Done, Prepared, Reservation, Trace, excerpt
from serve.metrics import Metrics
from serve.extractive import LoopGuard, abstain_reason, extract, quote
from serve.prompt import CitationFilter, PromptBuilder, PromptTooLong, attribute

log = logging.getLogger("ray.serve")


def public_source(source: str) -> str:
    """A passage's ``source`` as clients see it. Indexes hold it relative to the indexed folder
    (indexing/documents.py); one built before that holds the file's absolute path on the server,
    of which only the file's name is shown."""
    path = PureWindowsPath(source)  # reads both separators, and a drive
    if source.startswith(("/", "\\", "~")) or path.drive:
        return path.name
    return source


class Pipeline(StageCalls):
    """Search and chat over :class:`serve.calls.StageCalls`; chat yields :data:`ChatEvent` s."""

    def __init__(self, cfg, stages: Stages, *, metrics: Metrics | None = None, prompt: PromptBuilder | None = None,
                 governor: Governor | None = None):
        super().__init__(cfg, stages, metrics=metrics, governor=governor)
        self.prompt = prompt or PromptBuilder.from_config(cfg)
        self.model = cfg.generator.served_model_name
        self.limits = cfg.http.limits
        self.cache_enabled = cfg.governor.cache.enabled
        # Admission in this replica (keys cached, limits in governor.rate_limits.storage); the usage
        # this replica records is added to its cached quota snapshot.
        self.admission = Admission(cfg.governor, ingress_replicas=cfg.http.deployment.max_replicas)
        self._ingest: IngestService | None = None

    def record_usage(self, key_id: str | None, prompt_tokens: int, completion_tokens: int,
                     engine_s: dict[str, float] | None = None) -> None:
        self.admission.note_usage(key_id, prompt_tokens + completion_tokens,
                                  self.admission.cost(prompt_tokens, completion_tokens))
        super().record_usage(key_id, prompt_tokens, completion_tokens, engine_s)

    def warm_up(self) -> None:
        self.prompt.warm_up()

    def ingest(self) -> IngestService:
        """This process's ingest job service over the shared jobs, started on first use: its runner
        claims the next queued job whenever none runs service-wide. The jobs' builds run as Ray tasks
        in the graph; beside in-process stages (``serve.local``) in a thread, refreshing their
        retriever when a job publishes."""
        if self._ingest is None:
            retriever = getattr(self.stages, "retriever", None)
            refresh = getattr(retriever, "refresh", None)  # only the in-process retriever: the graph's replicas poll
            runner = self.cfg.documents.runner
            if runner == "auto" and refresh is not None:
                runner = "thread"
            svc = IngestService(self.cfg, db=self.governor.db, runner=runner,
                                on_published=(lambda _: refresh()) if refresh is not None else None)
            svc.start()
            self._ingest = svc
        return self._ingest

    def stop(self) -> None:
        """Stop this process's job runner (a job it runs is taken over by another replica once stale)."""
        if self._ingest is not None:
            self._ingest.stop()
            self._ingest = None

    async def _retrieve(
        self, trace: Trace, *, query: str, top_k: int, filters: Filters | None, strategy: str | None, rerank: bool
    ) -> list[Passage]:
        want = max(top_k, self.cfg.reranker.candidates) if rerank else top_k
        trace.strategy = strategy or self.cfg.retriever.strategy
        try:
            got = await self.call(
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
                rr = await self.call(
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
            raise stage_unavailable("retrieval", StageError("retriever", "unavailable", trace.reasons["retriever"]))
        trace.timings_ms["total"] = round((time.perf_counter() - trace.t0) * 1000, 2)
        return {
            "object": "search.results",
            "query": req.query,
            "results": [
                {
                    "rank": i + 1, "chunk_id": p.id, "document_id": p.document_id, "title": p.title,
                    "heading_path": p.heading_path, "source": public_source(p.source), "domain": p.domain,
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
        """Everything that decides the answer's tokens (the engine request's settings and the cache key)."""
        g = self.cfg.generator
        out = {
            "max_tokens": self.answer_tokens(req),
            "temperature": g.temperature if req.temperature is None else req.temperature,
            **{k: getattr(req, k) for k in ("top_p", "stop", "seed", "presence_penalty", "frequency_penalty", *EXTENSIONS)
               if getattr(req, k) is not None},
        }
        if "repetition_penalty" not in out and g.repetition_penalty != 1.0:  # repetition control for small models
            out["repetition_penalty"] = g.repetition_penalty
        if "frequency_penalty" not in out and g.frequency_penalty:
            out["frequency_penalty"] = g.frequency_penalty
        if req.min_tokens is not None and req.min_tokens > out["max_tokens"]:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) must be <= the answer's max_tokens ({out['max_tokens']})",
                           param="min_tokens", code="invalid_value")
        if "logit_bias" in out:
            out["logit_bias"] = {int(t): float(b) for t, b in out["logit_bias"].items()}
        if req.logprobs:
            out["logprobs"] = req.top_logprobs or 0
        if req.response_format is not None and req.response_format.type != "text":
            out["json_schema" if req.response_format.schema is not None else "json_object"] = (
                req.response_format.schema if req.response_format.schema is not None else True)
        return out

    def cacheable(self, req: ChatRequest, sampling: dict[str, Any], bypass: bool) -> bool:
        """Only answers that would come out the same again: greedy decoding or a fixed seed."""
        return self.cache_enabled and not bypass and req.rag.cache and "logprobs" not in sampling and (
            sampling["temperature"] == 0 or sampling.get("seed") is not None
        )

    def settle(self, reservation: Reservation | None, used: int = 0, cost: float = 0.0) -> bool:
        """Release a quota reservation made at admission (once), counting ``used`` tokens. False when
        there was none to release."""
        if reservation is None or reservation.settled:
            return False
        reservation.settled = True
        self.admission.settle(reservation.key_id, reservation.tokens, used, cost)
        return True

    async def prepare(self, req: ChatRequest, request_id: str, *, key_id: str | None = None,
                      reservation: Reservation | None = None,
                      bypass_cache: bool = False) -> Prepared:
        self.check_model(req)
        self.check_input(req)
        max_tokens = self.answer_tokens(req)
        top_k = self._top_k(req.rag.top_k, "rag.top_k")
        rerank = self._use_rerank(req.rag.rerank)
        trace = Trace(request_id)
        messages = [to_message(m) for m in req.messages if m.role != "assistant" or m.text]
        sources: list[Passage] = []
        rag = req.rag.enabled
        if rag:
            try:
                route = (await self.call("router", trace, lambda: self.stages.route(messages), self.timeouts.router)).value
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
        n_quote = self.cfg.generator.context_sentences
        given = [quote(trace.route.query, p, sentences_max=n_quote) for p in sources] if n_quote and sources else sources
        try:
            prompt = self.prompt.build(messages=messages, passages=given, max_tokens=max_tokens)
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
        trace.timings_ms["prompt"] = round((time.perf_counter() - t) * 1000, 2)
        key = None
        sampling = self.sampling(req)
        if self.cacheable(req, sampling, bypass_cache) and not trace.degraded:
            key = cache_key(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                rag=req.rag.model_dump(mode="json", exclude={"cache", "conversation_id"}), model=self.model,
                index_version=trace.version, sampling=sampling,
                key_id=key_id, shared=self.cfg.governor.cache.shared_across_keys,
            )
        # the sources are the passages as retrieved (the prompt may quote them): a prefix of ``sources``
        return Prepared(trace, prompt, rag, sources[: len(prompt.sources)], key_id=key_id, cache_key=key,
                        reservation=reservation)

    def engine_request(self, req: ChatRequest, prep: Prepared) -> GenRequest:
        sampling = self.sampling(req)
        stop = sampling.pop("stop", None)
        # the engine's id: the trace's (found in its logs) plus a suffix, since a client may send the
        # same X-Request-ID twice at once and vLLM refuses a duplicate running id
        return GenRequest(messages=prep.prompt.messages, stop=[stop] if isinstance(stop, str) else stop,
                          request_id=f"{prep.trace.request_id}-{uuid.uuid4().hex[:8]}", **sampling)

    async def start_generation(self, req: ChatRequest, prep: Prepared) -> tuple[AsyncIterator[GenDelta] | None, GenDelta | None]:
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
            first = GenDelta(finish_reason="stop")
        except Exception as e:
            err = e if isinstance(e, StageError) else (
                StageError("generator", "timeout", f"no first token in {self.timeouts.generator_first_token:g} s")
                if isinstance(e, asyncio.TimeoutError) else from_exception("generator", e)
            )
            m.errors.labels("generator", err.kind).inc()
            await _close(stream)
            if self.breaker is not None:  # a full queue or a refused value: a live generator saying "not so"
                self.breaker.success() if err.kind in ("overloaded", "invalid") else self.breaker.failure()
            if err.kind == "invalid":
                raise stage_unavailable("the generator", err) from None
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

    def direct_answer(self, req: ChatRequest, prep: Prepared) -> tuple[str, list[int], str, str | None] | None:
        """An answer that needs no generator: ``(text, cited source numbers, mode, why)``, or None to
        generate. "abstain" when retrieval is weak or the question is off-corpus
        (``generator.abstain_*``); "extractive" with ``generator.answer_mode: extractive``."""
        g = self.cfg.generator
        route = prep.trace.route
        if req.json_mode or not prep.rag or route is None or route.kind != "rag" or not prep.sources:
            return None
        why = abstain_reason(route.query, prep.sources, min_similarity=g.abstain_min_similarity,
                             min_coverage=g.abstain_min_coverage)
        if why is not None:
            return g.abstain_text, [], "abstain", why
        if g.answer_mode == "extractive":
            text, cited = extract(route.query, prep.sources, sentences_max=g.extractive_sentences,
                                  top_passages=g.extractive_passages)
            return (text, cited, "extractive", None) if text else (g.abstain_text, [], "abstain", "no sentence matches")
        return None

    def degraded_answer(self, prep: Prepared) -> tuple[str, list[int], str, str | None]:
        """The generator is down: the extractive answer from the top passages, said to be one, or
        the sources list when no sentence fits."""
        g = self.cfg.generator
        route = prep.trace.route
        text, cited = extract(route.query if route is not None else "", prep.sources,
                              sentences_max=g.extractive_sentences, top_passages=g.extractive_passages)
        if not text:
            return self.sources_only_text(prep), list(range(1, len(prep.sources) + 1)), "sources_only", None
        return ("The answer generator is unavailable right now; these sentences from the sources answer "
                f"best:\n{text}"), cited, "extractive", None

    def sources_only_text(self, prep: Prepared) -> str:
        lines = [
            "The answer generator is unavailable right now, so no answer was written. "
            "These are the most relevant sources for your question:"
        ]
        for i, p in enumerate(prep.sources, 1):
            lines.append(f"[{i}] {p.title or p.document_id}: {excerpt(p.text, 160)}")
        return "\n".join(lines)

    async def chat_events(self, req: ChatRequest, prep: Prepared) -> AsyncIterator[ChatEvent]:
        """:class:`Delta` ... then one :class:`Done`. The first event comes once generation has
        started (or degraded, or raised a 503), so a caller can still answer with an error status."""
        if prep.cache_key is not None:
            hit = await self._cache(self.governor.cache_get, prep.cache_key)
            self.metrics.cache_requests.labels("hit" if hit else "miss").inc()
            if hit:
                yield Delta(hit["text"])
                rag = {"sources": hit["sources"], "metadata": {
                    **self._meta(prep.trace, status="ok", usage=hit["usage"], prep=prep, cached=True),
                    "citations": hit["citations"],
                    "cached_request_id": hit_request_id(hit, shared=self.cfg.governor.cache.shared_across_keys)}}
                yield Done(hit["finish"], dict(hit["usage"]), rag)
                return
        else:
            self.metrics.cache_requests.labels("skip").inc()
        direct = self.direct_answer(req, prep)
        stream, first = (None, None) if direct is not None else await self.start_generation(req, prep)
        trace = prep.trace
        mode, note = "generate", None
        guard = (LoopGuard(ngram=self.cfg.generator.loop_ngram, repeats=self.cfg.generator.loop_repeats)
                 if self.cfg.generator.loop_stop and not req.json_mode else None)
        sent: list[str] = []
        cites = CitationFilter(len(prep.sources))
        raw = req.json_mode  # a JSON answer goes out as the engine wrote it: no citation edits, no markers added
        citations = "model"
        usage = {"prompt_tokens": prep.prompt.prompt_tokens, "completion_tokens": 0}
        finish = "stop"
        recorded = False
        if stream is None:
            text, cited, mode, note = direct or self.degraded_answer(prep)
            cites.cited = cited
            citations = "extracted" if mode == "extractive" else "listed"
            sent.append(text)
            yield Delta(text)
            status = "sources_only" if direct is None else "ok" if not trace.degraded else "degraded"
        else:
            t = time.perf_counter()
            chunk: GenDelta | None = first
            answer: list[str] = []
            broke = False
            try:
                while chunk is not None:
                    usage["completion_tokens"] += chunk.tokens
                    if chunk.text or chunk.logprobs:
                        out = chunk.text if raw else cites.feed(chunk.text)
                        if out or chunk.logprobs:
                            answer.append(out)
                            sent.append(out)
                            yield Delta(out, chunk.logprobs)
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                    if chunk.usage:
                        usage = {k: int(chunk.usage.get(k, 0)) for k in ("prompt_tokens", "completion_tokens")}
                    if getattr(chunk, "engine_s", None):
                        trace.engine_s = dict(chunk.engine_s)
                    if guard is not None and guard.feed(chunk.text) and not chunk.finish_reason:
                        finish = "stop"  # degenerate output (a loop): stop here, the engine request is closed
                        break
                    try:
                        chunk = await anext(stream)
                    except StopAsyncIteration:
                        chunk = None
            except Exception as e:  # mid-stream failure: keep what was sent, say so
                self.metrics.errors.labels("generator", "error").inc()
                trace.degrade("generator", f"stream broke after the first token: {type(e).__name__}: {e}")
                broke = True
                finish = "stop"  # OpenAI's values only; rag.metadata says the answer is cut short
            finally:
                await _close(stream)
                if not recorded and (broke or chunk is not None):
                    # the client went away (or the stream broke): charge the tokens made so far
                    recorded = True
                    self._count_usage(prep, usage)
            tail = "" if raw else cites.flush()
            answer.append(tail)
            if not raw and not cites.cited and not broke:
                found = attribute("".join(answer), prep.sources)
                if found:
                    cites.cited = found
                    citations = "attributed"
                    tail += " [" + ", ".join(str(n) for n in sorted(found)) + "]"
            if tail:
                sent.append(tail)
                yield Delta(tail)
            took = time.perf_counter() - t
            self.metrics.generation_duration.observe(took)
            trace.timings_ms["generator"] = round(took * 1000 + trace.timings_ms.get("generator.first_token", 0), 2)
            status = "ok" if not trace.degraded else "degraded"
        if stream is not None and not recorded:  # a sources-only answer sent nothing through the generator
            recorded = True
            self._count_usage(prep, usage)
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
                    "source": public_source(p.source), "domain": p.domain, "cited": i in cites.cited,
                }
                for i, p in enumerate(prep.sources, 1)
            ],
            "metadata": {**self._meta(trace, status=status, usage=usage, prep=prep),
                         "citations": citations if cites.cited else "none",
                         "answer": {"mode": mode, "loop_stopped": bool(guard is not None and guard.tripped),
                                    "note": note}},
        }
        if prep.cache_key is not None and status == "ok" and finish in ("stop", "length"):
            await self._cache(self.governor.cache_put, prep.cache_key, {
                "text": "".join(sent), "finish": finish, "usage": dict(usage), "sources": rag["sources"],
                "citations": rag["metadata"]["citations"], "request_id": trace.request_id,
            })
        yield Done(finish, usage, rag)

    def _count_usage(self, prep: Prepared, usage: dict[str, int]) -> None:
        self.metrics.generation_tokens.labels("prompt").inc(usage["prompt_tokens"])
        self.metrics.generation_tokens.labels("completion").inc(usage["completion_tokens"])
        p, c, engine_s = usage["prompt_tokens"], usage["completion_tokens"], prep.trace.engine_s
        if self.settle(prep.reservation, p + c, self.admission.cost(p, c)):
            # the reservation turned into the usage it covered (settle noted it): only the ledger is left
            StageCalls.record_usage(self, prep.key_id, p, c, engine_s)
        else:
            self.record_usage(prep.key_id, p, c, engine_s)

    async def _cache(self, fn: Any, *args: Any) -> Any:
        """A cache call; the cache is an optimisation, so a failure is a miss (counted), not an error."""
        try:
            return await self.state(fn, *args, attempts=1)
        except StageError as e:
            self.metrics.cache_requests.labels("error").inc()
            log.warning(f"response cache {fn.__name__} failed: {e}")
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

    async def chat_completion(self, req: ChatRequest, prep: Prepared) -> dict[str, Any]:
        """The whole answer as one ``chat.completion`` body."""
        from serve.openai import completion

        return await completion(self.chat_events(req, prep), request_id=prep.trace.request_id, model=self.model)


def to_message(m) -> Message:
    """A request message as the router and prompt builder take it: 'developer' is 'system'; a tool's
    result is context the user's side supplied."""
    if m.role == "developer":
        return Message("system", m.text)
    if m.role == "tool":
        return Message("user", f"Tool result ({m.tool_call_id}): {m.text}")
    return Message(m.role, m.text)


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            pass
