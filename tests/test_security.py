"""Issue 16's holes in the ingress, each tried the way an attacker or a careless client would: without
Ray, on the in-process app (serve/local.py: the same routes and admission as the Serve ingress;
its engine is never started, so no request here reaches vLLM) or on the pipeline with hand-written
stages (as in test_resilience.py)."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from state.db import open_database
from state.keys import SqlKeys
from deployments.errors import StageError
from deployments.governor import Governor
from deployments.retriever import HybridRetriever
from flow.requests import ChatRequest
from flow.errors import FlowError, redact, stage_unavailable
from serve.errors import http_of
from serve.launch import LaunchError, check_exposure
from flow.pipeline import Pipeline
from serve.admission import read_body
from test_pipeline import Stages
from deployments.generator import GenDelta


def make_cfg(local_cfg, built_index, tmp_path, *, auth=False, http=None):
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": auth}
    data["http"].update(http or {})
    return type(local_cfg).model_validate(data)


@pytest.fixture()
def app(local_cfg, built_index, tmp_path):
    def start(*, auth=False, http=None, client=("127.0.0.1", 50000), base_url="http://localhost"):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, auth=auth, http=http)
        api = create_app(cfg)
        return TestClient(api, client=client, base_url=base_url), api, cfg

    return start


def chat_body(**kw) -> dict:
    return {"model": "ragraph", "messages": [{"role": "user", "content": "When does the tasting room open?"}], **kw}


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# ---------------------------------------------------------------------------------------------
# row 2: numbers the engine would refuse are refused here, and an engine refusal is the client's 400


@pytest.mark.parametrize(("field", "value"), [
    ("seed", 2**64), ("seed", -(2**63) - 1), ("top_logprobs", 21), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0), ("logit_bias", {"5": 101}), ("logit_bias", {"word": 1}), ("stop_token_ids", [-1]),
])
def test_out_of_range_numbers_are_400_naming_the_field(app, field, value):
    client, _, _ = app()
    err = error_of(client.post("/v1/chat/completions", json=chat_body(**{field: value})), 400)
    assert err["param"] == field or err["message"].startswith(field), err


class Refusing:
    """An engine that refuses every request's values, as vLLM does for a bad sampling setting."""

    def __init__(self):
        self.calls = 0

    async def generate(self, request):
        self.calls += 1
        raise StageError("generator", "invalid", "seed is out of range")
        yield  # an async generator


def pipeline_with(local_cfg, built_index, tmp_path, engine, *, retriever=None):
    cfg = make_cfg(local_cfg, built_index, tmp_path)
    retriever = retriever or HybridRetriever.from_config(cfg)
    gov = Governor.from_config(cfg)
    p = Pipeline(cfg, Stages(retriever, engine), governor=gov)
    p.warm_up()
    return p, gov


def test_an_engine_refusal_is_400_and_never_opens_the_breaker(local_cfg, built_index, tmp_path):
    engine = Refusing()
    p, _ = pipeline_with(local_cfg, built_index, tmp_path, engine)
    threshold = p.cfg.http.breaker.failure_threshold

    async def go():
        for _ in range(threshold + 3):
            req = ChatRequest(**chat_body(seed=7))
            with pytest.raises(FlowError) as e:
                await p.chat_completion(req, await p.prepare(req, "rid", bypass_cache=True))
            assert http_of(e.value).status == 400 and "seed is out of range" in e.value.message

    asyncio.run(go())
    assert engine.calls == threshold + 3  # every request reached the engine: the breaker never opened
    from flow.breaker import CLOSED
    assert p.breaker.state == CLOSED


# ---------------------------------------------------------------------------------------------
# row 4: a client that leaves early is charged for what was generated


class Counting:
    """50 tokens, one per delta, then the final usage."""

    async def generate(self, request):
        for i in range(50):
            await asyncio.sleep(0)
            yield GenDelta(f"w{i} ", tokens=1)
        yield GenDelta("", "length", {"prompt_tokens": 30, "completion_tokens": 50})


def test_a_stream_left_after_40_tokens_is_charged_40(local_cfg, built_index, tmp_path):
    p, gov = pipeline_with(local_cfg, built_index, tmp_path, Counting())
    _, key = gov.keys.create("leaver")

    async def go():
        req = ChatRequest(**chat_body(stream=True))
        prep = await p.prepare(req, "rid", key_id=key.id, bypass_cache=True)
        events = p.chat_events(req, prep)
        seen = 0
        async for _ in events:
            seen += 1
            if seen == 40:
                break
        await events.aclose()  # what the SSE writer does when the client disconnects
        await p.drain()

    asyncio.run(go())
    day = Governor.from_config(p.cfg).usage(key.id)["day"]
    assert day["completion_tokens"] >= 39 and day["requests"] == 1, day


# ---------------------------------------------------------------------------------------------
# row 7: a body without Content-Length is read only up to the limit


def test_a_chunked_body_stops_being_read_at_the_limit():
    sent = {"chunks": 0}

    async def receive():
        sent["chunks"] += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": sent["chunks"] < 10_000}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
    request = Request(scope, receive)
    with pytest.raises(FlowError) as e:
        asyncio.run(read_body(request, 5_000))
    assert http_of(e.value).status == 413 and "5000" in e.value.message
    assert sent["chunks"] <= 6  # stopped at the limit, not after 10 MB


def test_a_chunked_body_over_the_limit_is_413_over_http(app):
    client, _, _ = app(http={"limits": {"max_body_bytes": 2000}})

    def body():
        yield b'{"model": "ragraph", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"a" * 100
        yield b'"}]}'

    err = error_of(client.post("/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and "2000" in err["message"]


def test_a_chunked_body_under_the_limit_still_reaches_the_route(app):
    client, _, _ = app()

    def body():
        yield b'{"query": "tasting '
        yield b'room hours"}'

    r = client.post("/v1/search", content=body(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["results"], r.json()


# ---------------------------------------------------------------------------------------------
# row 8: auth off is for this machine


def test_serving_beyond_loopback_with_auth_off_needs_insecure(local_cfg):
    cfg = local_cfg.model_copy(update={"http": local_cfg.http.model_copy(update={"host": "0.0.0.0"})})
    with pytest.raises(LaunchError, match="--insecure"):
        check_exposure(cfg)
    assert check_exposure(cfg, insecure=True).http.allowed_hosts == ["*"]
    assert check_exposure(local_cfg) is local_cfg  # loopback: nothing to refuse


def test_an_anonymous_caller_off_loopback_is_never_admin(app):
    remote, _, _ = app(client=("192.0.2.7", 40000))
    err = error_of(remote.delete("/v1/cache"), 403)
    assert err["code"] == "insufficient_scope" and "loopback" in err["message"]
    assert error_of(remote.get("/v1/usage", params={"all": "true"}), 403)["code"] == "insufficient_scope"
    local, _, _ = app()
    assert local.get("/v1/cache/stats").status_code == 200


# ---------------------------------------------------------------------------------------------
# row 12: /health/ready is cheap and says little to strangers


def test_ready_is_cached_and_details_are_for_admins(app):
    remote, api, _ = app(client=("192.0.2.7", 40000))
    stages = api.state.pipeline.stages
    calls = {"n": 0}

    async def readiness():
        calls["n"] += 1
        return {"index": None, "generator": "starting: engine in /srv/secret/models"}

    stages.readiness = readiness
    bodies = [remote.get("/health/ready") for _ in range(20)]
    assert calls["n"] == 1  # 20 hits within http.ready_cache_s: one check
    assert bodies[0].status_code == 503 and bodies[0].json()["checks"] == {"index": "ok", "generator": "not ready"}
    assert "/srv" not in bodies[0].text
    local = TestClient(api, client=("127.0.0.1", 1), base_url="http://localhost")
    assert "starting" in local.get("/health/ready").json()["checks"]["generator"]


# ---------------------------------------------------------------------------------------------
# row 13: DNS rebinding


def test_with_auth_off_only_local_host_names_are_answered(app):
    client, _, _ = app()
    err = error_of(client.post("/v1/search", json={"query": "hours"}, headers={"Host": "attacker.example"}), 400)
    assert err["code"] == "invalid_host"
    assert client.post("/v1/search", json={"query": "hours"}, headers={"Host": "127.0.0.1:8000"}).status_code == 200
    named, _, _ = app(http={"allowed_hosts": ["rag.internal"]})
    assert named.post("/v1/search", json={"query": "hours"}, headers={"Host": "rag.internal"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# row 15: stop sequences


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "x" * 257, [""]])
def test_stop_is_bounded(app, stop):
    client, _, _ = app()
    assert error_of(client.post("/v1/chat/completions", json=chat_body(stop=stop)), 400)["param"] == "stop"


# ---------------------------------------------------------------------------------------------
# row 16: no server paths or exception text, and the docs behind the key


def test_errors_carry_no_server_path_or_exception_text():
    err = stage_unavailable("the retriever", StageError("retriever", "unavailable", "no index in /srv/data/rag/index"))
    assert "/srv" not in err.message and "…/index" in err.message
    err = stage_unavailable("the retriever", StageError("retriever", "error", "KeyError: '/home/u/secret.txt' missing"))
    assert "secret" not in err.message and "KeyError" in err.message
    assert redact("GET /v1/models/x failed") == "GET /v1/models/x failed"


def test_the_api_docs_need_a_key_when_auth_is_on(app, tmp_path):
    client, _, cfg = app(auth=True)
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert error_of(client.get(path), 401)["code"] == "missing_api_key"
    token, _ = SqlKeys(open_database(cfg)).create("reader")
    r = client.get("/openapi.json", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]
    open_client, _, _ = app()
    assert open_client.get("/openapi.json").status_code == 200


# ---------------------------------------------------------------------------------------------
# row 10: one key never gets another key's cached answer (the cache's own keying is tested in
# test_governor_parts.py; this is the pipeline passing the key on)


class Echo:
    def __init__(self):
        self.calls = 0

    async def generate(self, request):
        self.calls += 1
        yield GenDelta("The tasting room opens at 10 am [1].", tokens=9)
        yield GenDelta("", "stop", {"prompt_tokens": 30, "completion_tokens": 9})


def test_the_response_cache_is_per_key(local_cfg, built_index, tmp_path):
    engine = Echo()
    p, gov = pipeline_with(local_cfg, built_index, tmp_path, engine)
    _, alice = gov.keys.create("alice")
    _, bob = gov.keys.create("bob")

    async def ask(key_id, rid):
        req = ChatRequest(**chat_body(temperature=0))
        return await p.chat_completion(req, await p.prepare(req, rid, key_id=key_id))

    async def go():
        first = await ask(alice.id, "alice-1")
        again = await ask(alice.id, "alice-2")
        other = await ask(bob.id, "bob-1")
        return first, again, other

    first, again, other = asyncio.run(go())
    assert again["rag"]["metadata"].get("cached") and again["rag"]["metadata"]["cached_request_id"] == "alice-1"
    assert not other["rag"]["metadata"].get("cached") and "alice-1" not in str(other)
    assert engine.calls == 2


# ---------------------------------------------------------------------------------------------
# OpenAI compatibility: the ingress's own overload refusal is OpenAI's JSON (Serve's is plain text)


def test_the_ingress_gate_refuses_in_openai_json_beyond_its_queue():
    from serve.graph import deployment_options
    from serve.admission import Gate
    from common.config import load_config

    async def go():
        gate = Gate(1, 1)
        release = asyncio.Event()

        async def hold():
            async with gate.slot():
                await release.wait()

        running = asyncio.create_task(hold())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(hold())
        await asyncio.sleep(0)
        assert gate.waiting == 1
        with pytest.raises(FlowError) as e:
            async with gate.slot():
                pass
        release.set()
        await asyncio.gather(running, waiting)
        async with gate.slot():  # free again
            pass
        return http_of(e.value)

    err = asyncio.run(go())
    assert err.status == 503 and err.code == "overloaded" and err.headers["Retry-After"]
    cfg = load_config()
    ingress = deployment_options(cfg)["ingress"]
    d = cfg.http.deployment
    assert ingress["max_queued_requests"] == -1  # Serve never answers for the ingress in plain text
    assert ingress["max_ongoing_requests"] == d.max_ongoing_requests + d.max_queued_requests


# ---------------------------------------------------------------------------------------------
# row 5 (wiring): the quota reservation a chat's admission makes is released however it ends (the
# reservation arithmetic itself is in test_admission.py)


def test_a_chats_quota_reservation_is_released_however_it_ends(app):
    client, api, cfg = app(auth=True)
    token, key = SqlKeys(open_database(cfg)).create("reserver")
    adm = api.state.pipeline.admission
    held = {}
    real_reserve = adm.reserve

    async def spy(*a, **kw):
        v = await real_reserve(*a, **kw)
        held["reserved"] = v.reserved
        held["during"] = adm.reserved(key.id)
        return v

    adm.reserve = spy
    auth = {"Authorization": f"Bearer {token}"}
    assert client.post("/v1/chat/completions", json=chat_body(seed=2**64), headers=auth).status_code == 400
    assert 0 < held["reserved"] <= cfg.generator.max_model_len and held["during"] == held["reserved"]
    assert adm.reserved(key.id) == 0  # refused by validation after admission: released
    r = client.post("/v1/chat/completions", json=chat_body(), headers=auth)
    assert adm.reserved(key.id) == 0
    assert r.status_code == 200, r.text  # sources only: the engine is not started here
    # the key's daily token quota, as OpenAI's token headers
    assert int(r.headers["x-ratelimit-limit-tokens"]) == cfg.governor.quotas.daily_tokens
    assert int(r.headers["x-ratelimit-remaining-tokens"]) < int(r.headers["x-ratelimit-limit-tokens"])
    r = client.post("/v1/chat/completions", json=chat_body(stream=True), headers=auth)
    assert r.status_code in (200, 503), r.text
    assert adm.reserved(key.id) == 0


# ---------------------------------------------------------------------------------------------
# OpenAI compatibility: x-ratelimit-* headers, as OpenAI sends them


def test_rate_limit_headers_count_down_and_come_with_the_429(app):
    client, _, cfg = app(auth=True)
    token, _ = SqlKeys(open_database(cfg)).create("counted", search_per_min=3)
    auth = {"Authorization": f"Bearer {token}"}
    seen = []
    for _ in range(3):
        r = client.post("/v1/search", json={"query": "tasting room hours"}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
        seen.append(int(r.headers["x-ratelimit-remaining-requests"]))
    assert seen == [2, 1, 0]
    r = client.post("/v1/search", json={"query": "tasting room hours"}, headers=auth)
    assert error_of(r, 429)["code"] == "rate_limit_exceeded"
    assert r.headers["x-ratelimit-remaining-requests"] == "0" and int(r.headers["Retry-After"]) >= 1


def test_openai_durations():
    from deployments.admission import openai_duration

    assert [openai_duration(x) for x in (0.25, 1, 59.6, 360, 3723)] == ["250ms", "1s", "1m0s", "6m0s", "1h2m3s"]


# ---------------------------------------------------------------------------------------------
# auth off beyond loopback is refused by the app builder itself, whichever way the app is started


def test_every_way_of_serving_refuses_auth_off_beyond_loopback(local_cfg, app, monkeypatch, capsys):
    """`ragraph serve` checked this alone; the graph builder, the `serve deploy` app builder (with the
    exported config), serve.local (its app and its --host) and `ragraph kuberay` now pass through one
    check, and the explicit opt-in (http.insecure_auth_off, what --insecure sets) lets each through."""
    import yaml

    from serve import graph, local
    from serve.launch import export_serve_config

    exposed = local_cfg.model_copy(update={"http": local_cfg.http.model_copy(update={"host": "0.0.0.0"})})
    for build in (graph.build_app, lambda c: graph.app_builder(yaml.safe_load(export_serve_config(c))
                                                               ["applications"][0]["args"])):
        with pytest.raises(graph.ExposureError, match="http.insecure_auth_off: true") as e:
            build(exposed)
        assert "--insecure" in str(e.value) and "0.0.0.0" in str(e.value)
    with pytest.raises(graph.ExposureError, match="with auth off"):
        app(http={"host": "0.0.0.0"})  # serve.local's create_app
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve.local started serving"))
    with pytest.raises(SystemExit, match="refusing to listen on 10.1.2.3 with auth off"):
        local.main(["--host", "10.1.2.3"])

    opted = check_exposure(exposed, insecure=True)  # what `ragraph serve --insecure [--export]` serves
    assert opted.http.insecure_auth_off is True and opted.http.allowed_hosts == ["*"]
    assert graph.exposure_problem(opted) is None
    args = yaml.safe_load(export_serve_config(opted))["applications"][0]["args"]
    assert args["http"]["insecure_auth_off"] is True  # serve deploy gets the opt-in with the config
    client, _, _ = app(http={"host": "0.0.0.0", "insecure_auth_off": True})
    assert client.get("/health").status_code == 200
    auth_on = exposed.model_copy(update={"governor": exposed.governor.model_copy(
        update={"auth": exposed.governor.auth.model_copy(update={"enabled": True})})})
    for ok in (local_cfg, auth_on, local_cfg.model_copy(update={"http": local_cfg.http.model_copy(
            update={"host": "127.0.0.2"})})):
        assert graph.exposure_problem(ok) is None
