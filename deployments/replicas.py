"""The stages' Serve deployments: thin wrappers that build a stage's plain class from its config
section in a replica (:mod:`deployments.router`, :mod:`deployments.retriever`,
:mod:`deployments.reranker`), batch concurrent calls where that pays (``@serve.batch``: the
retriever's query embeddings, the reranker's scoring) and answer with the replica's id. The plain
classes import no Ray; this module does.
"""

from __future__ import annotations

import numpy as np
from ray import serve

from deployments.reranker import CrossEncoderReranker
from deployments.retriever import Filters, HybridRetriever, Passage, timed_search
from deployments.router import Message, QueryRouter, Route
from indexing.store import IndexLoadError


class RouterDeployment:
    """Serve wrapper: the rules are microseconds, so no batching and no thread."""

    def __init__(self, cfg) -> None:
        self._router = QueryRouter.from_config(cfg)
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def route(self, messages: list[Message]) -> tuple[Route, str]:
        return self._router.run(messages=messages), self._replica


class RetrieverDeployment:
    """One retriever replica: query embeddings batched across concurrent requests with
    ``@serve.batch``; the search itself in a worker thread; a background task that follows the
    published index version (live swap: requests in flight finish on the version they started with)
    and reports the version it serves to the state database (:mod:`state.serving`), so that an
    ingest job is ``succeeded`` only once every replica serves what it published."""

    def __init__(self, cfg) -> None:
        import logging

        self._log = logging.getLogger("ray.serve")
        self._r = HybridRetriever.from_config(cfg)
        self._interval = cfg.retriever.reload_interval_s
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._error: str | None = None
        self._set_threads(cfg.retriever.threads() or cfg.retriever.deployment.num_cpus)
        self._r.embedder.warm_up()
        try:
            self._r.warm_up()
        except IndexLoadError as e:  # start anyway: report not-ready and pick the index up once published
            self._error = str(e)
            self._log.warning(f"retriever starts without an index: {e}")
        self._embed.set_max_batch_size(cfg.retriever.batch.max_batch_size)
        self._embed.set_batch_wait_timeout_s(cfg.retriever.batch.batch_wait_timeout_s)
        self._watcher = None
        self._cfg = cfg
        self._serving = None  # state.serving.SqlServing, opened by the watcher (a database that is down delays no search)

    @staticmethod
    def _set_threads(num_cpus: float) -> None:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))

    def _ensure_watcher(self) -> None:
        import asyncio

        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        import asyncio

        while True:
            await asyncio.to_thread(self._report)
            await asyncio.sleep(self._interval)
            try:
                new = await asyncio.to_thread(self._r.refresh)
            except IndexLoadError as e:
                self._error = f"refused new index version: {e}"
                self._log.error(self._error)
                continue
            except Exception as e:  # keep watching; the current version keeps serving
                self._log.exception(f"index refresh failed: {e}")
                continue
            if new:
                self._error = None
                self._log.info(f"switched to index version {new}")

    def _report(self) -> None:
        """Tell the state database which version this replica serves (best effort: logged on failure)."""
        import socket

        try:
            if self._serving is None:
                from state.db import open_database
                from state.serving import SqlServing

                self._serving = SqlServing(open_database(self._cfg))
            st = self._r._state
            self._serving.report(self._replica, st.index.name if st else None, host=socket.gethostname())
        except Exception as e:
            self._log.warning(f"could not report the served index version: {type(e).__name__}: {e}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)  # sizes reset from the config in __init__
    async def _embed(self, queries: list[str]) -> list[np.ndarray]:
        import asyncio

        vectors = await asyncio.to_thread(self._r.embedder.embed, queries)
        return list(vectors)

    async def search(self, query: str, top_k: int, filters: Filters | None, strategy: str | None) -> tuple:
        """(passages, replica id, info) for :class:`flow.pipeline.StageReply`."""
        self._ensure_watcher()
        if not self._r.loaded:
            raise IndexLoadError(self._error or "no index loaded")
        # the query embedding is batched with concurrent requests
        passages, info = await timed_search(self._r, self._embed, query=query, top_k=top_k, filters=filters,
                                            strategy=strategy)
        return passages, self._replica, info

    async def info(self) -> dict:
        self._ensure_watcher()
        st = self._r._state
        return {
            "replica": self._replica,
            "version": st.index.name if st else None,
            "chunks": len(st.index) if st else 0,
            "error": self._error,
            "index_dir": str(self._r.index_dir),
        }

    async def check_health(self) -> None:
        self._ensure_watcher()


class RerankerDeployment:
    """Cross-encoder replicas; concurrent requests are scored in one ``predict`` (``@serve.batch``)."""

    def __init__(self, cfg) -> None:
        import torch

        self._ce = CrossEncoderReranker.from_config(cfg)
        self._ce.warm_up()
        torch.set_num_threads(max(1, int(cfg.reranker.deployment.num_cpus)))
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._score.set_max_batch_size(cfg.reranker.batch.max_batch_size)
        self._score.set_batch_wait_timeout_s(cfg.reranker.batch.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _score(self, requests: list[tuple[str, list[Passage], int | None]]) -> list[list[Passage]]:
        import asyncio

        return await asyncio.to_thread(self._ce.run_batch, requests)

    async def rerank(self, query: str, passages: list[Passage], top_k: int | None) -> tuple[list[Passage], str]:
        if not passages:
            return [], self._replica
        return await self._score((query, passages, top_k)), self._replica
