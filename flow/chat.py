"""Chat preparation: everything a chat does before its answer is written.

:meth:`ChatPreparation.prepare` checks the request (the model, the limits, the answer's tokens),
routes the conversation (the router stage: small talk skips retrieval), retrieves and reranks
(:class:`flow.search.Search`), builds the prompt (:class:`flow.prompt.PromptBuilder`) and, for a
deterministic request, the response cache's key; :meth:`ChatPreparation.cached` looks the answer
up and :meth:`ChatPreparation.remember` stores one.

A failed router leaves the last user message as the query, hybrid strategy (flagged ``router``).
Answers are cached only when they would come out the same again (greedy decoding or a fixed
seed), keyed by the conversation, the RAG options, the model, the sampling settings and the index
version that answered, so a new index never serves an old answer. The cache is an optimisation: a
cache that fails is a miss (counted), never an error.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from deployments.cache import cache_key
from deployments.engine import EXTENSIONS
from deployments.errors import StageError
from deployments.retriever import Passage
from deployments.router import Message, Route
from flow.calls import StageCalls
from flow.errors import FlowError
from flow.events import Prepared, Reservation
from flow.extractive import quote
from flow.prompt import PromptBuilder, PromptTooLong
from flow.requests import ChatRequest, check_limits
from flow.search import Search

log = logging.getLogger("ray.serve")


def to_message(m: Any) -> Message:
    """A request message as the router and prompt builder take it: 'developer' is 'system'; a tool's
    result is context the user's side supplied."""
    if m.role == "developer":
        return Message("system", m.text)
    if m.role == "tool":
        return Message("user", f"Tool result ({m.tool_call_id}): {m.text}")
    return Message(m.role, m.text)


class ChatPreparation:
    def __init__(self, calls: StageCalls, search: Search, prompt: PromptBuilder, *, model: str) -> None:
        self.calls, self.cfg, self.search, self.prompt, self.model = calls, calls.cfg, search, prompt, model
        self.cache_enabled = calls.cfg.governor.cache.enabled

    def check_model(self, req: ChatRequest) -> None:
        if req.model != self.model:
            raise FlowError(
                            "not_found", f"the model {req.model!r} does not exist; this service serves {self.model!r} "
                            "(GET /v1/models)", param="model", code="model_not_found",
                            )

    def answer_tokens(self, req: ChatRequest) -> int:
        g = self.cfg.generator
        n = req.answer_tokens or g.max_tokens
        if n > g.max_tokens_limit:
            param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise FlowError("invalid", f"{param} must be <= {g.max_tokens_limit}, got {n}", param=param,
                            code="invalid_value")
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
            raise FlowError("invalid", f"min_tokens ({req.min_tokens}) must be <= the answer's max_tokens "
                            f"({out['max_tokens']})", param="min_tokens", code="invalid_value")
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

    async def prepare(self, req: ChatRequest, request_id: str, *, key_id: str | None = None,
                      reservation: Reservation | None = None, bypass_cache: bool = False) -> Prepared:
        self.check_model(req)
        check_limits(req, self.cfg.http.limits)
        max_tokens = self.answer_tokens(req)
        top_k = self.search.top_k(req.rag.top_k, "rag.top_k")
        rerank = self.search.use_rerank(req.rag.rerank)
        trace = self.calls.trace(request_id)
        messages = [to_message(m) for m in req.messages if m.role != "assistant" or m.text]
        sources: list[Passage] = []
        rag = req.rag.enabled
        if rag:
            calls = self.calls
            try:
                route = (await calls.call("router", trace, lambda: calls.stages.route(messages),
                                          calls.timeouts.router)).value
            except StageError as e:
                trace.degrade("router", e.detail)
                route = Route(kind="rag", query=messages[-1].content, reasons=("router unavailable",))
            trace.route = route
            if route.kind == "rag":
                filters = self.search.filters(req.rag.filters, route)
                strategy = req.rag.strategy or (route.strategy if route.strategy != "none" else None)
                sources = await self.search.retrieve(
                    trace, query=route.query, top_k=top_k, filters=filters, strategy=strategy, rerank=rerank
                )
        t = time.perf_counter()
        n_quote = self.cfg.generator.context_sentences
        given = [quote(trace.route.query, p, sentences_max=n_quote) for p in sources] if n_quote and sources else sources
        try:
            prompt = self.prompt.build(messages=messages, passages=given, max_tokens=max_tokens)
        except PromptTooLong as e:
            raise FlowError("invalid", str(e), param="messages", code="context_length_exceeded") from None
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

    async def cached(self, prep: Prepared) -> dict[str, Any] | None:
        """The cached answer to ``prep`` (None: a miss, or a request that is not looked up), counted."""
        labels = self.calls.metrics.cache_requests.labels
        if prep.cache_key is None:
            labels("skip").inc()
            return None
        hit = await self._cache(self.calls.governor.cache_get, prep.cache_key)
        labels("hit" if hit else "miss").inc()
        return hit or None

    async def remember(self, prep: Prepared, entry: dict[str, Any]) -> None:
        """Store an answer under ``prep``'s cache key."""
        await self._cache(self.calls.governor.cache_put, prep.cache_key, entry)

    async def _cache(self, fn: Any, *args: Any) -> Any:
        """A cache call; the cache is an optimisation, so a failure is a miss (counted), not an error."""
        try:
            return await self.calls.state(fn, *args, attempts=1)
        except StageError as e:
            self.calls.metrics.cache_requests.labels("error").inc()
            log.warning(f"response cache {fn.__name__} failed: {e}")
            return None
