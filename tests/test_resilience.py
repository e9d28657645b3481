"""Retries, the generator's circuit breaker, the response cache, usage records and input limits,
in the pipeline without Ray: the real router, retriever (over the test corpus), prompt builder and
governor (SQLite in a temporary folder). Stage failures are injected by hand-written stages, as in
test_pipeline.py; the same failures with real Ray replicas are in tests/faults/."""

from __future__ import annotations

import asyncio

import pytest

from deployments.governor import Governor
from deployments.retriever import HybridRetriever
from flow.requests import ChatRequest, SearchRequest
from flow.errors import FlowError
from serve.errors import http_of
from flow.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from deployments.errors import StageError
from flow.calls import StageReply
from flow.pipeline import Pipeline
from test_pipeline import Engine, Stages, ask, chat


@pytest.fixture(scope="module")
def retriever(built_index, local_cfg):
    r = HybridRetriever.from_config(local_cfg, index_dir=built_index[1])
    r.warm_up()
    return r


def config(local_cfg, tmp_path, *, http=None, cache=None):
    data = local_cfg.model_dump()
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["http"]["retries"].update(backoff_s=0.01)
    data["http"].update(http or {})
    data["governor"]["cache"].update(cache or {})
    return type(local_cfg).model_validate(data)


class Flaky(Stages):
    """Fails the first ``fail`` calls of a stage with ``kind``, then works."""

    def __init__(self, retriever, engine, *, stage="retriever", fail=1, kind="unavailable", version=None):
        super().__init__(retriever, engine)
        self.stage, self.fail, self.kind, self.version = stage, fail, kind, version
        self.calls = 0

    async def retrieve(self, *, query, top_k, filters, strategy):
        self.calls += 1
        if self.stage == "retriever" and self.calls <= self.fail:
            raise StageError("retriever", self.kind, "replica died (ActorDiedError)")
        reply = await super().retrieve(query=query, top_k=top_k, filters=filters, strategy=strategy)
        if self.version:
            reply = StageReply(reply.value, reply.replica, {**reply.info, "version": self.version})
        return reply


def make(cfg, retriever, engine=None, **kw):
    gov = Governor.from_config(cfg)
    stages = Flaky(retriever, engine or Engine(), **kw)
    p = Pipeline(cfg, stages, governor=gov)
    p.warm_up()
    return p, stages, gov


# ---------------------------------------------------------------------------------------------
# retries


def test_lost_retriever_replica_is_retried_and_the_answer_is_whole(local_cfg, retriever, tmp_path):
    p, stages, _ = make(config(local_cfg, tmp_path), retriever, fail=2)
    out = asyncio.run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    assert meta["status"] == "ok" and meta["degraded"] == [] and meta["retries"] == {"retriever": 2}
    assert stages.calls == 3 and out["rag"]["sources"]
    assert p.metrics.retries.labels("retriever")._value.get() == 2


@pytest.mark.parametrize("kind", ["overloaded", "timeout"])
def test_backpressure_and_timeouts_are_not_retried(local_cfg, retriever, tmp_path, kind):
    p, stages, _ = make(config(local_cfg, tmp_path), retriever, fail=1, kind=kind)
    out = asyncio.run(ask(p, chat()))
    assert stages.calls == 1
    assert out["rag"]["metadata"]["degraded"] == ["retriever"] and out["rag"]["metadata"]["retries"] == {}


def test_search_retries_then_503_when_every_try_fails(local_cfg, retriever, tmp_path):
    p, stages, _ = make(config(local_cfg, tmp_path), retriever, fail=99)
    with pytest.raises(FlowError) as e:
        asyncio.run(p.search(SearchRequest(query="tasting room hours"), "rid"))
    assert http_of(e.value).status == 503 and http_of(e.value).headers["Retry-After"] == "5"
    assert stages.calls == local_cfg.http.retries.attempts


class Silent(Flaky):
    """The first ``fail`` retriever calls never answer (a replica on a node that died silently)."""

    async def retrieve(self, **kw):
        self.calls += 1
        if self.calls <= self.fail:
            await asyncio.sleep(3600)
        return await Stages.retrieve(self, **kw)


@pytest.mark.parametrize("cut", [None, 0.2])
def test_a_silent_replica_is_cut_short_and_retried_only_with_an_attempt_timeout(local_cfg, retriever, tmp_path, cut):
    cfg = config(local_cfg, tmp_path, http={"retries": {"backoff_s": 0.01, "attempt_timeout_s": cut},
                                           "timeouts": {"retriever": 1.0}})
    gov = Governor.from_config(cfg)
    stages = Silent(retriever, Engine(), fail=1)
    p = Pipeline(cfg, stages, governor=gov)
    p.warm_up()
    out = asyncio.run(ask(p, chat()))
    meta = out["rag"]["metadata"]
    if cut is None:  # the whole budget waits on the silent replica, then the answer degrades
        assert stages.calls == 1 and meta["degraded"] == ["retriever"]
    else:  # 0.2 s on the silent one, then another try answers
        assert stages.calls == 2 and meta["status"] == "ok" and meta["retries"] == {"retriever": 1}
        assert p.metrics.errors.labels("retriever", "stalled")._value.get() == 1


def test_the_last_try_gets_the_whole_stage_timeout(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path, http={"retries": {"attempts": 2, "attempt_timeout_s": 0.1},
                                           "timeouts": {"retriever": 0.5}})
    p, _, _ = make(cfg, retriever)
    calls: list[float] = []

    async def slow():
        calls.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.3)  # longer than a cut try, shorter than the stage timeout
        return "answered"

    assert asyncio.run(p.retrying("retriever", slow, 0.5)) == "answered" and len(calls) == 2


def test_backoff_is_bounded_and_grows(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path, http={"retries": {"attempts": 5, "backoff_s": 0.5, "max_backoff_s": 1.5}})
    p, _, _ = make(cfg, retriever)
    waits = {a: [p.backoff(a) for _ in range(400)] for a in (1, 2, 3, 4)}
    assert all(0 <= w <= 0.5 for w in waits[1]) and max(waits[2]) > 0.55  # doubles...
    assert all(w <= 1.5 for w in waits[4])  # ...up to the cap
    assert len({round(w, 6) for w in waits[1]}) > 100  # jittered: replicas do not retry in lockstep


# ---------------------------------------------------------------------------------------------
# the circuit breaker


def test_breaker_state_machine_with_a_clock():
    now = [0.0]
    seen = []
    b = CircuitBreaker(failure_threshold=3, reset_timeout_s=10, clock=lambda: now[0], on_change=seen.append)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == CLOSED
    b.allow()
    b.failure()
    assert b.state == OPEN and not b.allow() and b.retry_in() == 10
    now[0] = 9.9
    assert not b.allow()
    now[0] = 10
    assert b.allow() and b.state == HALF_OPEN
    assert not b.allow()  # one trial at a time
    b.failure()
    assert b.state == OPEN  # a failed trial opens it again at once
    now[0] = 20
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.failures == 0
    assert seen == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_generator_breaker_opens_half_opens_and_closes(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path, http={"breaker": {"enabled": True, "failure_threshold": 2, "reset_timeout_s": 3}})
    engine = Engine("down")
    p, _, _ = make(cfg, retriever, engine, stage="none")
    state = p.metrics.breaker_state._value

    async def go():
        statuses = []
        for i in range(4):  # 2 failures open it; the next 2 never reach the engine
            out = await ask(p, chat(), f"r{i}", bypass_cache=True)
            statuses.append(out["rag"]["metadata"]["status"])
        assert statuses == ["sources_only"] * 4 and len(engine.requests) == 2
        assert state.get() == 2 and "circuit open" in out["rag"]["metadata"]["degraded_reasons"]["generator"]
        await asyncio.sleep(3.05)
        engine.mode = "ok"  # the generator is back: the half-open trial succeeds and closes it
        out = await ask(p, chat(), "trial", bypass_cache=True)
        assert out["rag"]["metadata"]["status"] == "ok" and state.get() == 0 and len(engine.requests) == 3

    asyncio.run(go())


def test_open_breaker_without_sources_is_503_with_the_wait(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path, http={"breaker": {"failure_threshold": 1, "reset_timeout_s": 30}})
    p, _, _ = make(cfg, retriever, Engine("down"), stage="none")
    req = chat(rag={"enabled": False})

    async def go():
        with pytest.raises(FlowError):
            await ask(p, req)
        with pytest.raises(FlowError) as e:
            await ask(p, req)
        return http_of(e.value)

    err = asyncio.run(go())
    assert err.status == 503 and "circuit open" in err.message and 25 <= int(err.headers["Retry-After"]) <= 30


def test_an_overloaded_generator_does_not_trip_the_breaker(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path, http={"breaker": {"failure_threshold": 1}})
    p, _, _ = make(cfg, retriever, Engine("overloaded"), stage="none")
    for _ in range(3):
        with pytest.raises(FlowError) as e:
            asyncio.run(ask(p, chat(), bypass_cache=True))
        assert http_of(e.value).status == 503 and e.value.code == "overloaded"
    assert p.breaker.state == CLOSED


# ---------------------------------------------------------------------------------------------
# the response cache


def test_cache_hit_says_cached_and_skips_the_generator(local_cfg, retriever, tmp_path):
    engine = Engine()
    p, _, gov = make(config(local_cfg, tmp_path), retriever, engine, stage="none")

    async def go():
        first = await ask(p, chat("When does the tasting room open?"), "first")
        again = await ask(p, chat("  When does the tasting   room open  "), "second")  # spacing and '?' ignored, case kept
        return first, again

    first, again = asyncio.run(go())
    assert len(engine.requests) == 1
    assert first["rag"]["metadata"]["cached"] is False and again["rag"]["metadata"]["cached"] is True
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["rag"]["sources"] == first["rag"]["sources"] and again["usage"] == first["usage"]
    assert again["rag"]["metadata"]["request_id"] == "second"
    assert again["rag"]["metadata"]["cached_request_id"] == "first"
    assert gov.cache_stats()["hits"] == 1 and p.metrics.cache_requests.labels("hit")._value.get() == 1


def test_cache_is_bypassed_by_request_and_skipped_when_sampling(local_cfg, retriever, tmp_path):
    engine = Engine()
    p, _, _ = make(config(local_cfg, tmp_path), retriever, engine, stage="none")

    async def go():
        await ask(p, chat())
        await ask(p, chat(rag={"cache": False}))  # the body's bypass
        await ask(p, chat(), bypass_cache=True)  # Cache-Control: no-cache
        await ask(p, chat(temperature=0.8))  # sampled: would not come out the same
        await ask(p, chat(temperature=0.8))
        hit = await ask(p, chat(temperature=0.8, seed=7))
        hit = await ask(p, chat(temperature=0.8, seed=7))
        return hit

    hit = asyncio.run(go())
    assert len(engine.requests) == 6 and hit["rag"]["metadata"]["cached"] is True


def test_a_new_index_version_never_serves_an_old_answer(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path)
    gov = Governor.from_config(cfg)
    engine = Engine()
    old = Pipeline(cfg, Flaky(retriever, engine, stage="none", version="v-old"), governor=gov)
    new = Pipeline(cfg, Flaky(retriever, engine, stage="none", version="v-new"), governor=gov)

    async def go():
        await ask(old, chat())
        await ask(old, chat())
        return await ask(new, chat())

    out = asyncio.run(go())
    assert len(engine.requests) == 2 and out["rag"]["metadata"]["cached"] is False
    assert out["rag"]["metadata"]["index_version"] == "v-new"


def test_degraded_answers_are_not_cached(local_cfg, retriever, tmp_path):
    engine = Engine("down")
    p, _, gov = make(config(local_cfg, tmp_path, http={"breaker": {"enabled": False}}), retriever, engine, stage="none")
    asyncio.run(ask(p, chat()))
    engine.mode = "ok"
    out = asyncio.run(ask(p, chat()))
    assert out["rag"]["metadata"]["status"] == "ok" and not out["rag"]["metadata"]["cached"]
    assert gov.cache_stats()["stores"] == 1


# ---------------------------------------------------------------------------------------------
# usage


def test_generated_tokens_are_recorded_for_the_key(local_cfg, retriever, tmp_path):
    cfg = config(local_cfg, tmp_path)
    p, _, gov = make(cfg, retriever, stage="none")
    _, key = gov.keys.create("alice")

    async def go():
        await ask(p, chat(), key_id=key.id)
        await ask(p, chat(), key_id=key.id)  # a cache hit costs the generator nothing
        await ask(p, chat("Is parking free?"), key_id=key.id)
        await p.drain()

    asyncio.run(go())
    day = Governor.from_config(cfg).usage(key.id)["day"]  # a fresh process's view: it is on disk
    assert day == {**day, "requests": 2, "prompt_tokens": 100, "completion_tokens": 24, "total_tokens": 124}


# ---------------------------------------------------------------------------------------------
# input limits


@pytest.mark.parametrize(
    ("req", "param", "needle"),
    [
        (lambda: chat("x" * 101), "messages[0].content", "at most 100"),
        (lambda: ChatRequest(model="ragraph", messages=[{"role": "user", "content": "hi"}] * 5), "messages", "at most 4"),
        (lambda: SearchRequest(query="q" * 51), "query", "at most 50"),
    ],
)
def test_input_limits_name_the_field_and_the_limit(local_cfg, retriever, tmp_path, req, param, needle):
    cfg = config(local_cfg, tmp_path, http={"limits": {"max_message_chars": 100, "max_messages": 4, "max_query_chars": 50}})
    p, stages, _ = make(cfg, retriever, stage="none")
    r = req()

    async def go():
        return await (p.search(r, "rid") if isinstance(r, SearchRequest) else p.prepare(r, "rid"))

    with pytest.raises(FlowError) as e:
        asyncio.run(go())
    assert http_of(e.value).status == 400 and e.value.param == param and needle in e.value.message
    assert stages.calls == 0  # refused before any stage ran


def test_breaker_retry_in_counts_down():
    now = [100.0]
    b = CircuitBreaker(failure_threshold=1, reset_timeout_s=5, clock=lambda: now[0])
    b.failure()
    now[0] += 2
    assert b.retry_in() == pytest.approx(3) and "next trial in 3 s" in b.describe()


def test_a_cancelled_trial_frees_the_half_open_slot():
    now = [0.0]
    b = CircuitBreaker(failure_threshold=1, reset_timeout_s=1, clock=lambda: now[0])
    b.failure()
    now[0] = 1
    assert b.allow() and not b.allow()  # the trial is out
    b.release()  # ...and its client went away before the generator answered
    assert b.allow() and b.state == HALF_OPEN


def test_a_state_call_may_be_given_longer_than_http_timeouts_governor(local_cfg):
    """An upload's job is written to the spool and the database (files fsync'd): the documents API's
    submit passes http.timeouts.ingest_submit instead of the 3 s meant for admission and cache calls."""
    import time as _time

    from flow.calls import StageCalls

    def slow(what):
        _time.sleep(0.3)
        return what

    http = local_cfg.http.model_copy(update={"timeouts": local_cfg.http.timeouts.model_copy(update={"governor": 0.05})})
    calls = StageCalls(local_cfg.model_copy(update={"http": http}), None, governor=object())
    with pytest.raises(StageError) as e:
        asyncio.run(calls.state(slow, "ingest", attempts=1))
    assert e.value.kind == "timeout" and e.value.stage == "state"
    assert asyncio.run(calls.state(slow, "ingest", attempts=1, timeout=2)) == "ingest"
    assert local_cfg.http.timeouts.ingest_submit > local_cfg.http.timeouts.governor
    # and the documents API asks for it on a submit only
    from types import SimpleNamespace

    from serve import documents

    asked = []

    async def state(fn, *args, timeout=None):
        asked.append((fn.__name__, timeout))

    service = SimpleNamespace(submit=lambda *a: None, job=lambda *a: None)
    service.submit.__name__, service.job.__name__ = "submit", "job"
    pipeline = SimpleNamespace(cfg=local_cfg, state=state, ingest=lambda: service)
    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(pipeline=pipeline)))
    asyncio.run(documents.ingest_call(request, service.submit, "job_1", timeout=local_cfg.http.timeouts.ingest_submit))
    asyncio.run(documents.ingest_call(request, service.job, "job_1"))
    assert asked == [("submit", local_cfg.http.timeouts.ingest_submit), ("job", None)]
