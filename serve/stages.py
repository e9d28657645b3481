"""The stages as the pipeline calls them (:class:`flow.calls.Stages`): Serve deployment handles in
the graph (:class:`HandleStages`), or the plain classes in this process (:class:`InProcessStages`,
for ``serve.local``). Both generate through :mod:`deployments.generator`'s one seam."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from deployments.errors import StageError, from_exception
from deployments.generator import EngineGenerator, GenDelta, GenRequest, ServeGenerator
from deployments.reranker import CrossEncoderReranker
from deployments.retriever import Filters, HybridRetriever, Passage, timed_search
from deployments.router import Message, QueryRouter
from flow.calls import StageReply

REPLICA = "in-process"


class HandleStages:
    """:class:`flow.calls.Stages` over Serve deployment handles (the graph). ``router``: a handle,
    or a :class:`deployments.router.QueryRouter` that runs in this ingress replica
    (``router.placement: ingress``; ``replica`` names the ingress replica in the trace)."""

    def __init__(self, *, app_name: str, router, retriever, reranker, generator, replica: str = "ingress") -> None:
        self.app_name = app_name
        self.router, self.retriever, self.reranker = router, retriever, reranker
        self.generator = ServeGenerator(generator)
        self.rerank_enabled = reranker is not None
        self.replica = replica

    async def route(self, messages: list[Message]) -> StageReply:
        if isinstance(self.router, QueryRouter):  # fused into the ingress: microseconds, no hop
            try:
                return StageReply(self.router.run(messages=messages), self.replica)
            except Exception as e:
                raise from_exception("router", e) from None
        try:
            route, replica = await self.router.route.remote(messages)
        except Exception as e:
            raise from_exception("router", e) from None
        return StageReply(route, replica)

    async def retrieve(self, *, query: str, top_k: int, filters: Filters | None, strategy: str | None) -> StageReply:
        try:
            passages, replica, info = await self.retriever.search.remote(query, top_k, filters, strategy)
        except Exception as e:
            raise from_exception("retriever", e) from None
        return StageReply(passages, replica, info)

    async def rerank(self, *, query: str, passages: list[Passage], top_k: int) -> StageReply:
        try:
            ranked, replica = await self.reranker.rerank.remote(query, passages, top_k)
        except Exception as e:
            raise from_exception("reranker", e) from None
        return StageReply(ranked, replica)

    def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]:
        return self.generator.generate(request)

    async def readiness(self) -> dict[str, str | None]:
        """Stage -> None when fine, else what is wrong. Every probe is bounded: a stage still
        starting must not hang the readiness check."""
        from ray import serve as ray_serve

        problems: dict[str, str | None] = {}
        try:
            status = (await asyncio.wait_for(asyncio.to_thread(ray_serve.status), 5)).applications.get(self.app_name)
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
            problems["index"] = f"unknown: the retriever is not answering ({from_exception('retriever', e).detail})"
        return problems


class InProcessStages:
    """:class:`flow.calls.Stages` over the plain classes; the generator is vLLM's ``AsyncLLM``
    with the engine arguments the graph's ``ray.serve.llm`` deployment uses."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.router = QueryRouter.from_config(cfg)
        if (threads := cfg.retriever.threads()) is not None:  # what a retriever replica uses (deployments/replicas.py)
            import torch

            torch.set_num_threads(threads)
        self.retriever = HybridRetriever.from_config(cfg)
        self.retriever.embedder.warm_up()
        self.retriever.warm_up()
        self.reranker = CrossEncoderReranker.from_config(cfg) if cfg.reranker.enabled else None
        if self.reranker is not None:
            self.reranker.warm_up()
        self.rerank_enabled = self.reranker is not None
        self.engine: EngineGenerator | None = None

    async def start(self) -> None:
        self.engine = EngineGenerator.start(self.cfg)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    async def route(self, messages: list[Message]) -> StageReply:
        return StageReply(self.router.run(messages=messages), REPLICA)

    async def retrieve(self, *, query: str, top_k: int, filters: Filters | None, strategy: str | None) -> StageReply:
        async def embed(q: str):
            return (await asyncio.to_thread(self.retriever.embedder.embed, [q]))[0]

        passages, info = await timed_search(self.retriever, embed, query=query, top_k=top_k, filters=filters,
                                            strategy=strategy)
        return StageReply(passages, REPLICA, info)

    async def rerank(self, *, query: str, passages: list[Passage], top_k: int) -> StageReply:
        ranked = await asyncio.to_thread(self.reranker.run_batch, [(query, passages, top_k)])
        return StageReply(ranked[0], REPLICA)

    async def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]:
        if self.engine is None:
            raise StageError("generator", "unavailable", "the engine is not started")
        async for delta in self.engine.generate(request):
            yield delta

    async def readiness(self) -> dict[str, str | None]:
        return {
            "generator": None if self.engine is not None else "starting",
            "index": None if self.retriever.loaded else f"no index loaded from {self.retriever.index_dir}; run `ragraph index`",
        }
