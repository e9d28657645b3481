"""The same pipeline without Ray: the plain stage classes called directly in one process, behind
the same routes as the Serve ingress (uvicorn instead of Serve's proxy).

It is the other side of the graph-overhead benchmark (``load_tests/bench_graph.py``) and a way to
debug the pipeline in one process. It is not a production mode: no replicas, no autoscaling, no
backpressure, no live index swap (the index is read at start-up).

    python -m serve.local [--config FILE] [--port 8001]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.governor import Governor
from deployments.reranker import CrossEncoderReranker
from deployments.retriever import Filters, HybridRetriever, Passage, timed_search
from deployments.router import Message, QueryRouter
from serve.api import ApiError, ChatRequest, SearchRequest
from serve.app import (
    METRICS, ObservedRoute, _api_error, _http_error, _invalid, _unexpected, cache_call, chat_response, model_card, models_list,
    ready_response, search_response, usage_response,
)
from serve.pipeline import GenChunk, Pipeline, StageError, StageReply

REPLICA = "in-process"


class InProcessStages:
    """:class:`serve.pipeline.Stages` over the plain classes; the generator is vLLM's ``AsyncLLM``
    with the engine arguments the graph's ``ray.serve.llm`` deployment uses."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.router = QueryRouter.from_config(cfg)
        self.retriever = HybridRetriever.from_config(cfg)
        self.retriever.embedder.warm_up()
        self.retriever.warm_up()
        self.reranker = CrossEncoderReranker.from_config(cfg) if cfg.reranker.enabled else None
        if self.reranker is not None:
            self.reranker.warm_up()
        self.rerank_enabled = self.reranker is not None
        self.governor = Governor.from_config(cfg)
        self.engine = None
        self._tok = None

    async def start(self) -> None:
        import os

        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        g = self.cfg.generator
        location = self.cfg.models.location("generator")
        os.environ.update(g.engine_env())
        self._tok = AutoTokenizer.from_pretrained(location)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**g.engine_kwargs(location)))

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

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[GenChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if self.engine is None:
            raise StageError("generator", "unavailable", "the engine is not started")
        text = self._tok.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
        ids = self._tok.encode(text, add_special_tokens=False)
        params = SamplingParams(
            max_tokens=request["max_tokens"], temperature=request["temperature"], top_p=request.get("top_p", 1.0),
            seed=request.get("seed"), stop=request.get("stop"), output_kind=RequestOutputKind.DELTA,
            presence_penalty=request.get("presence_penalty") or 0.0,
            frequency_penalty=request.get("frequency_penalty") or 0.0,
        )
        produced = 0
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
                o = out.outputs[0]
                produced += len(o.token_ids)
                usage = {"prompt_tokens": len(ids), "completion_tokens": produced} if out.finished else None
                yield GenChunk(o.text, o.finish_reason if out.finished else None, usage)
        except StageError:
            raise
        except Exception as e:
            raise StageError("generator", "error", f"{type(e).__name__}: {e}"[:300]) from None

    async def govern(self, method: str, *args: Any) -> Any:
        # on the loop, like the governor's replica: one SQLite connection, one caller at a time
        # (a usage write is one fsync'd transaction, about 0.2 ms)
        return getattr(self.governor, method)(*args)

    async def readiness(self) -> dict[str, str | None]:
        return {
            "generator": None if self.engine is not None else "starting",
            "index": None if self.retriever.loaded else f"no index loaded from {self.retriever.index_dir}; run `ragraph index`",
        }


def create_app(cfg) -> FastAPI:
    stages = InProcessStages(cfg)
    pipeline = Pipeline(cfg, stages, metrics=METRICS)
    pipeline.warm_up()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await stages.start()
        try:
            yield
        finally:
            stages.stop()

    api = FastAPI(title="ragraph (in-process)", version="0.1.0", lifespan=lifespan)
    api.add_exception_handler(RequestValidationError, _invalid)
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected)
    api.router.route_class = ObservedRoute
    api.state.pipeline = pipeline

    @api.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await chat_response(pipeline, body, request)

    @api.post("/v1/search")
    async def search(body: SearchRequest, request: Request) -> JSONResponse:
        return await search_response(pipeline, body, request)

    @api.get("/v1/models")
    async def models() -> dict:
        return models_list(pipeline)

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        return model_card(pipeline, model_id)

    @api.get("/v1/usage")
    async def usage(request: Request, key_id: str | None = None, all_keys: bool = Query(False, alias="all")) -> dict:
        return await usage_response(pipeline, request, key_id, all_keys)

    @api.get("/v1/cache/stats")
    async def cache_stats() -> dict:
        return await cache_call(pipeline, "cache_stats")

    @api.delete("/v1/cache")
    async def cache_clear() -> dict:
        return {"object": "cache.cleared", "removed": await cache_call(pipeline, "cache_clear")}

    @api.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @api.get("/health/ready")
    async def ready() -> JSONResponse:
        return await ready_response(pipeline)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(METRICS.render(), media_type="text/plain; version=0.0.4")

    return api


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from serve.config import load_config

    p = argparse.ArgumentParser(prog="python -m serve.local", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    from serve.launch import auth_notice

    cfg = load_config(args.config)
    notice = auth_notice(cfg)
    if notice:
        print(f"note: {notice}")
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
