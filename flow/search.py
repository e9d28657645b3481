"""Search: a query's passages, retrieved (the retriever stage), reranked (the reranker stage, when
asked for and running) and cut to ``top_k``; also the chat's retrieval (:meth:`Search.retrieve`).

A failed reranker keeps the retrieval order (flagged ``reranker``); a failed retriever gives no
passages (flagged ``retriever``), which a search cannot answer without: ``unavailable``.
"""

from __future__ import annotations

import time
from typing import Any

from deployments.errors import StageError
from deployments.retriever import Filters, Passage
from deployments.router import Route
from flow.calls import StageCalls
from flow.errors import FlowError, stage_unavailable
from flow.events import Trace, excerpt, metadata, public_source
from flow.requests import SearchRequest, check_limits


class Search:
    def __init__(self, calls: StageCalls, *, model: str) -> None:
        self.calls, self.cfg, self.model = calls, calls.cfg, model

    async def retrieve(
        self, trace: Trace, *, query: str, top_k: int, filters: Filters | None, strategy: str | None, rerank: bool
    ) -> list[Passage]:
        calls, stages = self.calls, self.calls.stages
        want = max(top_k, self.cfg.reranker.candidates) if rerank else top_k
        trace.strategy = strategy or self.cfg.retriever.strategy
        try:
            got = await calls.call(
                "retriever", trace,
                lambda: stages.retrieve(query=query, top_k=want, filters=filters, strategy=strategy),
                calls.timeouts.retriever,
            )
        except StageError as e:
            trace.degrade("retriever", e.detail if e.kind != "error" else str(e))
            return []
        calls.metrics.retrieval_duration.observe(trace.timings_ms["retriever"] / 1000)
        trace.version = got.info.get("version")
        calls.metrics.saw_version(trace.version)
        for k in ("embed_ms", "search_ms", "batch_size"):
            if k in got.info:
                trace.timings_ms[f"retriever.{k.removesuffix('_ms')}"] = got.info[k]
        passages: list[Passage] = got.value
        if rerank and passages:
            try:
                rr = await calls.call(
                    "reranker", trace, lambda: stages.rerank(query=query, passages=passages, top_k=top_k),
                    calls.timeouts.reranker,
                )
                passages = rr.value
            except StageError as e:
                trace.degrade("reranker", e.detail)
        return passages[:top_k]

    def filters(self, req_filters: Any, route: Route | None) -> Filters | None:
        """The request's filters (``rag.filters``), or else the router's domains; None when none apply."""
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
            raise FlowError("invalid", str(e), code=None, param="rag.filters") from None
        return f if f.active else None

    def top_k(self, asked: int | None, param: str) -> int:
        k = asked or self.cfg.retriever.top_k
        limit = self.cfg.retriever.max_top_k
        if k > limit:
            raise FlowError("invalid", f"{param} must be <= {limit}, got {k}", param=param, code="invalid_value")
        return k

    def use_rerank(self, asked: bool | None) -> bool:
        enabled = self.calls.stages.rerank_enabled
        want = enabled if asked is None else asked
        if want and not enabled:
            raise FlowError("invalid", "rerank was requested but this service runs no reranker (reranker.enabled: "
                            "false)", code=None, param="rerank")
        return want

    async def search(self, req: SearchRequest, request_id: str) -> dict[str, Any]:
        check_limits(req, self.cfg.http.limits)
        trace = self.calls.trace(request_id)
        top_k = self.top_k(req.top_k, "top_k")
        rerank = self.use_rerank(req.rerank)
        passages = await self.retrieve(trace, query=req.query, top_k=top_k, filters=self.filters(req.filters, None),
                                       strategy=req.strategy, rerank=rerank)
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
            "metadata": metadata(trace, model=self.model, status="ok" if not trace.degraded else "degraded"),
        }
