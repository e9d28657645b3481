"""The request flow below the HTTP layer (flow/) and the one mapping of its errors to HTTP:

* the flow runs with no FastAPI or Starlette loaded (a search and a chat, with stand-in stages);
* every kind of :class:`flow.errors.FlowError` has its status, error type and ``Retry-After``, in
  ``serve/errors.py`` alone;
* every route declares its access level (and every JSON route its ``response_model``), and the one
  access dependency refuses a keyless caller of a user route (401) and a user key on an admin route
  (403).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from flow.errors import KINDS, FlowError
from serve.errors import STATUS, http_of

REPO = Path(__file__).resolve().parent.parent

FLOW_ALONE = r"""
import asyncio, importlib, json, pkgutil, sys, tempfile
from pathlib import Path

import flow
for m in pkgutil.iter_modules(flow.__path__):
    importlib.import_module("flow." + m.name)

from common.config import load_config
from deployments.generator import GenDelta
from deployments.governor import Governor
from deployments.retriever import Passage
from deployments.router import Route
from flow.calls import StageReply
from flow.errors import FlowError
from flow.pipeline import Pipeline
from flow.requests import ChatRequest, SearchRequest

PASSAGE = Passage(id="hours.md#0", document_id="hours.md", text="The tasting room opens at 10 am.", title="Hours",
                  score=1.0)


class Stages:
    rerank_enabled = False

    async def route(self, messages):
        return StageReply(Route(kind="rag", query=messages[-1].content), "r1")

    async def retrieve(self, *, query, top_k, filters, strategy):
        return StageReply([PASSAGE], "ret1", {"version": "v1"})

    async def rerank(self, *, query, passages, top_k):
        raise AssertionError("no reranker")

    async def generate(self, request):
        yield GenDelta("It opens at 10 am [1].", "stop", {"prompt_tokens": 9, "completion_tokens": 7})

    async def readiness(self):
        return {}


cfg = load_config(Path(sys.argv[1]), environ={})
cfg = cfg.model_copy(update={
    "governor": cfg.governor.model_copy(update={"db": Path(tempfile.mkdtemp()) / "gov.sqlite3"}),
    "generator": cfg.generator.model_copy(update={"answer_mode": "generate", "abstain_min_similarity": 0.0,
                                                  "abstain_min_coverage": 0.0}),
})
p = Pipeline(cfg, Stages(), governor=Governor.from_config(cfg))


async def go():
    found = await p.search(SearchRequest(query="opening hours"), "rid-1")
    req = ChatRequest(model=cfg.generator.served_model_name, messages=[{"role": "user", "content": "When?"}])
    answer = await p.chat_completion(req, await p.prepare(req, "rid-2"))
    try:
        await p.search(SearchRequest(query="x", top_k=10_000), "rid-3")
    except FlowError as e:
        refused = [e.kind, e.code, e.param]
    await p.drain()
    return found, answer, refused

found, answer, refused = asyncio.run(go())
loaded = sorted(m for m in ("fastapi", "starlette") if m in sys.modules)
print(json.dumps({"loaded": loaded, "result": found["results"][0]["document_id"],
                  "answer": answer["choices"][0]["message"]["content"], "refused": refused}))
"""


def test_the_flow_runs_without_fastapi_or_starlette(tmp_path):
    out = subprocess.run([sys.executable, "-c", FLOW_ALONE, str(REPO / "configs" / "local.yaml")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loaded"] == [], f"the flow imported {got['loaded']}"
    assert got["result"] == "hours.md" and "10 am" in got["answer"]
    assert got["refused"] == ["invalid", "invalid_value", "top_k"]


# ---------------------------------------------------------------------------------------------
# one mapping from a kind of error to HTTP

#  kind            status  OpenAI's error type
EXPECTED = [
    ("invalid", 400, "invalid_request_error"),
    ("unauthorized", 401, "invalid_request_error"),
    ("forbidden", 403, "permission_error"),
    ("not_found", 404, "invalid_request_error"),
    ("timeout", 408, "invalid_request_error"),
    ("conflict", 409, "invalid_request_error"),
    ("too_large", 413, "invalid_request_error"),
    ("unsupported", 415, "invalid_request_error"),
    ("rate_limited", 429, "rate_limit_error"),
    ("quota", 429, "insufficient_quota"),
    ("overloaded", 503, "service_unavailable"),
    ("unavailable", 503, "service_unavailable"),
]


def test_the_table_names_every_kind():
    assert [k for k, _, _ in EXPECTED] == list(KINDS) and set(STATUS) == set(KINDS)


@pytest.mark.parametrize(("kind", "status", "type_"), EXPECTED)
def test_each_kind_has_its_status_type_and_retry_after(kind, status, type_):
    err = http_of(FlowError(kind, "went wrong", code="some_code", param="field"))
    assert (err.status, err.type, err.code, err.param, err.message) == (status, type_, "some_code", "field", "went wrong")
    assert "Retry-After" not in err.headers  # no advice given, none sent
    assert (err.headers.get("WWW-Authenticate") == "Bearer") == (status == 401)
    waited = http_of(FlowError(kind, "went wrong", code="some_code", retry_after_s=2.2, limits={"x-ratelimit-a": "1"}))
    assert waited.status == status
    assert list(waited.headers)[:2] == ["Retry-After", "x-ratelimit-a"] and waited.headers["Retry-After"] == "3"
    assert waited.body() == {"error": {"message": "went wrong", "type": type_, "param": None, "code": "some_code"}}


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        FlowError("teapot", "no", code=None)


@pytest.mark.parametrize("kind", KINDS)
def test_the_app_answers_a_flow_error_with_its_status_and_body(kind):
    from serve.errors import install

    app = FastAPI()
    install(app)

    @app.get("/x")
    async def x():
        raise FlowError(kind, "said /srv/secret/file.txt", code="c", retry_after_s=7)

    r = TestClient(app).get("/x")
    status, type_ = STATUS[kind]
    assert r.status_code == status and r.headers["Retry-After"] == "7"
    assert r.json() == {"error": {"message": "said …/file.txt", "type": type_, "param": None, "code": "c"}}


# ---------------------------------------------------------------------------------------------
# routes: an access level each, a response model for JSON, one dependency enforcing access

NOT_JSON = {"/metrics", "/", "/static/{name}", "/docs", "/redoc", "/docs/assets/{name}"}


def routes():
    from fastapi.routing import APIRoute

    from serve.routes import make_app

    return [r for r in make_app().routes if isinstance(r, APIRoute)]


def test_every_route_declares_its_access_and_every_json_route_its_response_model():
    from serve.admission import ACCESS, Access
    from serve.routes import ACCESS_OF
    from serve.routetable import LEVELS

    seen = routes()
    assert len(seen) >= 29
    for r in seen:
        gates = [d.dependency for d in r.dependencies if isinstance(d.dependency, Access)]
        assert len(gates) == 1 and gates[0].level in LEVELS, r.path
        assert gates[0] is ACCESS[r.access] and ACCESS_OF[(next(iter(r.methods)), r.path)] == r.access, r.path
        if r.path in NOT_JSON:
            assert r.response_model is None and not issubclass(r.response_class, JSONResponse), r.path
        else:
            assert r.response_model is not None, f"{r.path} has no response_model"
    levels = {r.path: r.access for r in seen}
    assert levels["/health"] == levels["/"] == "public" and levels["/metrics"] == "metrics"
    assert levels["/v1/cache/stats"] == levels["/v1/jobs"] == "admin" and levels["/v1/chat/completions"] == "user"


def make_cfg(local_cfg, tmp_path, *, auth: bool):
    data = local_cfg.model_dump()
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": auth}
    return type(local_cfg).model_validate(data)


@pytest.fixture()
def keyed_app(local_cfg, tmp_path):
    from deployments.governor import Governor
    from flow.pipeline import Pipeline
    from serve.routes import make_app
    from state.db import open_database
    from state.keys import SqlKeys

    class Stages:
        rerank_enabled = False

    cfg = make_cfg(local_cfg, tmp_path, auth=True)
    app = make_app()
    app.state.pipeline = Pipeline(cfg, Stages(), governor=Governor.from_config(cfg))
    keys = SqlKeys(open_database(cfg))
    user, _ = keys.create("user")
    admin, _ = keys.create("admin", scope="admin")
    return TestClient(app, client=("127.0.0.1", 50000), base_url="http://localhost"), user, admin


def test_a_user_route_refuses_a_caller_without_a_key(keyed_app):
    client, user, _ = keyed_app
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "missing_api_key"
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {user}"}).status_code == 200


def test_an_admin_route_refuses_a_user_key(keyed_app):
    client, user, admin = keyed_app
    r = client.get("/v1/cache/stats", headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    ok = client.get("/v1/cache/stats", headers={"Authorization": f"Bearer {admin}"})
    assert ok.status_code == 200 and "enabled" in ok.json()


def test_the_access_dependency_alone_guards_a_route(keyed_app):
    """A route of its own, declared with an access level and nothing else, is guarded the same."""
    from serve.routes import dependencies

    client, user, admin = keyed_app

    async def probe() -> dict:
        return {"ok": True}

    client.app.router.add_api_route("/probe", probe, methods=["GET"], dependencies=dependencies("admin"))
    assert client.get("/probe").status_code == 401
    assert client.get("/probe", headers={"Authorization": f"Bearer {user}"}).status_code == 403
    assert client.get("/probe", headers={"Authorization": f"Bearer {admin}"}).json() == {"ok": True}
