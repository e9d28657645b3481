"""The ingress pipeline without Ray: real router, real retriever over the test corpus, real
prompt builder; the generator is a hand-written engine (this tests error mapping, degradation
and streaming framing, not generation; the real engine is tested in test_serve_graph.py)."""

import asyncio
import json

import pytest

from deployments.retriever import HybridRetriever
from deployments.router import QueryRouter
from flow.requests import ChatRequest, SearchRequest
from flow.errors import FlowError
from serve.errors import http_of
from deployments.errors import StageError
from deployments.generator import GenDelta as GenChunk
from serve.openai import sse_stream
from flow.calls import StageReply
from flow.pipeline import Pipeline


class Engine:
    """Echoes the first context block's words back, citing it, then a bad citation."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.requests = []

    async def generate(self, request):
        self.requests.append(request)
        if self.mode == "overloaded":
            raise StageError("generator", "overloaded", "its queue is full")
        if self.mode == "down":
            raise StageError("generator", "unavailable", "no replica is running")
        for piece in ["The tasting room opens at 10 am [", "1]", " and closes at 6 pm [7]."]:
            await asyncio.sleep(0)
            yield GenChunk(piece)
        yield GenChunk("", "stop", {"prompt_tokens": 50, "completion_tokens": 12})


class Stages:
    def __init__(self, retriever, engine, *, retriever_down=False):
        self.router, self.retriever, self.engine = QueryRouter(), retriever, engine
        self.rerank_enabled = False
        self.retriever_down = retriever_down

    async def route(self, messages):
        return StageReply(self.router.run(messages=messages), "r1")

    async def retrieve(self, *, query, top_k, filters, strategy):
        if self.retriever_down:
            raise StageError("retriever", "unavailable", "replica died (ActorDiedError)")
        res = self.retriever.search(query=query, top_k=top_k, filters=filters, strategy=strategy)
        return StageReply(res.passages, "ret1", {"version": res.version})

    async def rerank(self, *, query, passages, top_k):
        raise AssertionError("reranker is disabled")

    def generate(self, request):
        return self.engine.generate(request)

    async def readiness(self):
        return {"retriever": None, "index": None}


@pytest.fixture(scope="module")
def retriever(built_index, local_cfg):
    r = HybridRetriever.from_config(local_cfg, index_dir=built_index[1])
    r.warm_up()
    return r


def pipeline(cfg, retriever, engine=None, **kw):
    from deployments.governor import Governor

    governor = kw.pop("governor", None) or Governor.from_config(cfg)
    p = Pipeline(cfg, Stages(retriever, engine or Engine(), **kw), governor=governor)
    p.warm_up()
    return p


def chat(text="When does the tasting room open?", **kw):
    return ChatRequest(model="ragraph", messages=[{"role": "user", "content": text}], **kw)


async def ask(p: Pipeline, req: ChatRequest, rid: str = "rid", **kw) -> dict:
    return await p.chat_completion(req, await p.prepare(req, rid, **kw))


def run(coro):
    return asyncio.run(coro)


def test_answer_cites_and_drops_unknown_numbers(local_cfg, retriever):
    p = pipeline(local_cfg, retriever)

    out = run(ask(p, chat(), "rid-1"))
    text = out["choices"][0]["message"]["content"]
    assert text == "The tasting room opens at 10 am [1] and closes at 6 pm ."
    rag = out["rag"]
    assert rag["sources"][0]["document_id"] == "visiting/hours.md" and rag["sources"][0]["cited"]
    meta = rag["metadata"]
    assert meta["request_id"] == "rid-1" and meta["status"] == "ok" and meta["index_version"] == retriever.version
    assert {"router", "retriever", "prompt", "generator", "total"} <= set(meta["timings_ms"])
    assert out["usage"] == {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62}


def test_stream_frames_and_final_chunk_carries_rag(local_cfg, retriever):
    p = pipeline(local_cfg, retriever)

    async def go():
        req = chat(stream=True)
        prep = await p.prepare(req, "rid-2")
        return [line async for line in sse_stream(p.chat_events(req, prep), request_id=prep.trace.request_id,
                                                     model=p.model)]

    lines = run(go())
    assert lines[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-rid-2" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == (
        "The tasting room opens at 10 am [1] and closes at 6 pm ."
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["rag"]["sources"][0]["document_id"] == "visiting/hours.md"
    assert all("rag" not in c for c in chunks[:-1])


def test_generator_down_gives_sources_only(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, Engine("down"))

    out = run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    assert meta["status"] == "sources_only" and meta["degraded"] == ["generator"]
    assert "no replica is running" in meta["degraded_reasons"]["generator"]
    assert "generator is unavailable" in out["choices"][0]["message"]["content"]
    assert out["rag"]["sources"][0]["document_id"] == "visiting/hours.md"
    assert p.metrics.generation_tokens.labels("prompt")._value.get() == 0  # nothing went through the generator


def test_generator_down_without_sources_is_503(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, Engine("down"))

    with pytest.raises(FlowError) as e:
        run(ask(p, chat(rag={"enabled": False})))
    assert http_of(e.value).status == 503 and e.value.code == "generator_unavailable"


def test_generator_overloaded_is_503_with_retry_after(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, Engine("overloaded"))

    with pytest.raises(FlowError) as e:
        run(ask(p, chat()))
    assert http_of(e.value).status == 503 and http_of(e.value).headers["Retry-After"] and e.value.code == "overloaded"


def test_retriever_down_degrades_to_no_context(local_cfg, retriever):
    engine = Engine()
    p = pipeline(local_cfg, retriever, engine, retriever_down=True)

    out = run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    assert meta["degraded"] == ["retriever"] and meta["status"] == "degraded" and out["rag"]["sources"] == []
    assert "Context:" not in engine.requests[0].messages[-1]["content"]
    # a lost replica is retried (http.retries.attempts tries in all) before the answer degrades
    tries = local_cfg.http.retries.attempts
    assert p.metrics.errors.labels("retriever", "unavailable")._value.get() == tries
    assert p.metrics.retries.labels("retriever")._value.get() == tries - 1 == meta["retries"]["retriever"]


def test_search_is_503_when_the_retriever_is_down(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, retriever_down=True)
    with pytest.raises(FlowError) as e:
        run(p.search(SearchRequest(query="parking"), "rid"))
    assert http_of(e.value).status == 503


def test_search_results_and_scores(local_cfg, retriever):
    p = pipeline(local_cfg, retriever)
    out = run(p.search(SearchRequest(query="is parking free?", top_k=3), "rid"))
    assert out["results"][0]["document_id"] == "visiting/hours.md"
    assert {"bm25", "dense"} <= set(out["results"][0]["scores"])
    assert out["metadata"]["index_version"] == retriever.version and "retriever" in out["metadata"]["timings_ms"]


def test_small_talk_skips_retrieval(local_cfg, retriever):
    engine = Engine()
    p = pipeline(local_cfg, retriever, engine)
    prep = run(p.prepare(chat("hello!"), "rid"))
    assert prep.sources == [] and "retriever" not in prep.trace.timings_ms


@pytest.mark.parametrize(
    "change, status, param",
    [
        ({"model": "gpt-4"}, 404, "model"),
        ({"max_tokens": 100000}, 400, "max_tokens"),
        ({"rag": {"top_k": 1000}}, 400, "rag.top_k"),
        ({"rag": {"rerank": True}}, 400, "rerank"),
    ],
)
def test_request_limits(local_cfg, retriever, change, status, param):
    p = pipeline(local_cfg, retriever)
    body = {"model": "ragraph", "messages": [{"role": "user", "content": "hi there, parking?"}], **change}
    with pytest.raises(FlowError) as e:
        run(p.prepare(ChatRequest(**body), "rid"))
    assert http_of(e.value).status == status and e.value.param == param and e.value.message


def _with_generator(cfg, **update):
    return cfg.model_copy(update={"generator": cfg.generator.model_copy(update=update)})


def test_generator_down_answers_extractively(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, Engine("down"))

    out = run(ask(p, chat()))
    meta, text = out["rag"]["metadata"], out["choices"][0]["message"]["content"]
    assert meta["status"] == "sources_only" and meta["answer"]["mode"] == "extractive"
    assert "10" in text and "[1]" in text  # the tasting room's opening hour, cited
    assert out["rag"]["sources"][0]["cited"] and meta["citations"] == "extracted"


def test_extractive_mode_answers_without_the_generator(local_cfg, retriever):
    engine = Engine()
    p = pipeline(_with_generator(local_cfg, answer_mode="extractive"), retriever, engine)

    out = run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    assert meta["status"] == "ok" and meta["answer"]["mode"] == "extractive" and engine.requests == []
    assert "[1]" in out["choices"][0]["message"]["content"]


def test_off_corpus_question_is_declined_without_generating(local_cfg, retriever):
    engine = Engine()
    cfg = _with_generator(local_cfg, abstain_min_similarity=0.45, abstain_min_coverage=0.7)
    p = pipeline(cfg, retriever, engine)

    out = run(ask(p, chat("Who won the 1998 football World Cup?")))
    meta = out["rag"]["metadata"]
    assert meta["answer"]["mode"] == "abstain" and meta["answer"]["note"] and engine.requests == []
    assert out["choices"][0]["message"]["content"] == cfg.generator.abstain_text
    assert not any(s["cited"] for s in out["rag"]["sources"])
    out = run(ask(p, chat("When does the tasting room open?")))
    assert out["rag"]["metadata"]["answer"]["mode"] == "generate" and len(engine.requests) == 1


def test_repetition_defaults_reach_the_engine_unless_the_request_sets_them(local_cfg, retriever):
    p = pipeline(_with_generator(local_cfg, repetition_penalty=1.2, frequency_penalty=0.3), retriever)
    assert p.sampling(chat())["repetition_penalty"] == 1.2 and p.sampling(chat())["frequency_penalty"] == 0.3
    assert p.sampling(chat(repetition_penalty=1.0, frequency_penalty=0.0))["repetition_penalty"] == 1.0


class LoopingEngine(Engine):
    async def generate(self, request):
        self.requests.append(request)
        for _ in range(50):
            yield GenChunk("the hybrid score computed by ", tokens=5)
        yield GenChunk("", "length", {"prompt_tokens": 50, "completion_tokens": 250})


def test_loop_stop_ends_a_degenerate_answer(local_cfg, retriever):
    p = pipeline(local_cfg, retriever, LoopingEngine())

    out = run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    assert meta["answer"]["loop_stopped"] and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"].count("hybrid score computed") <= 4
