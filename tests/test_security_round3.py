"""What any key can read of the server and what a structured-output schema may cost, tried without
Ray: on the in-process app (serve/local.py: the same routes and admission as the Serve ingress; its
engine is never started) or on the pipeline with hand-written stages (as in test_security.py).

* no response names a folder of the server (the index, the indexed source, the models);
* the API documentation pages load only the service's own pinned scripts, under a strict CSP;
* a ``response_format`` schema is bounded in size, nesting and numbers before any compile, and the
  generator's compile of it is time-limited and done once per schema (keyed by its hash).
"""

from __future__ import annotations

import asyncio
import time
import json
import re

import pytest
from fastapi.testclient import TestClient

from flow.requests import ChatRequest
from test_security import Echo, chat_body, make_cfg, pipeline_with


@pytest.fixture()
def app(local_cfg, built_index, tmp_path):
    def start(*, auth=False, http=None):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, auth=auth, http=http)
        return TestClient(create_app(cfg), client=("127.0.0.1", 50000), base_url="http://localhost"), cfg

    return start


def server_folders(cfg, built_index) -> list[str]:
    source, index = built_index
    return [str(source), str(source.resolve()), str(index), str(index.resolve()), str(cfg.models.dir),
            str(cfg.models.dir.resolve())]


# ---------------------------------------------------------------------------------------------
# no response carries a path on the server


def test_models_and_sources_carry_no_server_path(app, built_index, local_cfg, tmp_path):
    client, cfg = app()
    models = client.get("/v1/models")
    search = client.post("/v1/search", json={"query": "When does the tasting room open?", "top_k": 3})
    assert models.status_code == 200 and search.status_code == 200, (models.text, search.text)
    assert models.json()["data"][0]["root"] == cfg.models.generator.name
    results = search.json()["results"]
    assert results and all(not r["source"].startswith("/") for r in results)
    # the source is the file relative to the indexed folder: for a text file, its document id
    assert all(r["source"] == r["document_id"] for r in results), [(r["source"], r["document_id"]) for r in results]

    p, _ = pipeline_with(local_cfg, built_index, tmp_path, Echo())

    async def ask():
        req = ChatRequest(**chat_body(temperature=0))
        return await p.chat_completion(req, await p.prepare(req, "rid-paths", bypass_cache=True))

    chat = asyncio.run(ask())
    sources = chat["rag"]["sources"]
    assert sources and all(s["source"] == s["document_id"] for s in sources), sources
    for text in (models.text, search.text, json.dumps(chat)):
        for folder in server_folders(cfg, built_index):
            assert folder not in text


def test_an_index_built_with_absolute_sources_shows_only_the_file_name():
    from flow.events import public_source

    assert public_source("/srv/rag/corpus/guide/tasting.md") == "tasting.md"
    assert public_source("C:\\corpus\\guide\\tasting.md") == "tasting.md"
    assert public_source("guide/tasting.md") == "guide/tasting.md"
    assert public_source("upload:notes.md") == "upload:notes.md"


def test_rows_of_a_jsonl_source_name_their_file_relative_to_the_folder(tmp_path):
    from indexing.documents import read_source

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "rows.jsonl").write_text(json.dumps({"id": "r1", "text": "Opens at ten."}) + "\n")
    (tmp_path / "a.md").write_text("# A\n\ntext\n")
    docs = {d.id: d.source for d in read_source(tmp_path)}
    assert docs == {"r1": "shop/rows.jsonl", "a.md": "a.md"}


# ---------------------------------------------------------------------------------------------
# the API documentation pages run only pinned files of this origin


DOC_PAGES = ("/docs", "/redoc")


def test_the_api_docs_load_only_pinned_files_of_this_origin_under_a_csp(app):
    import re

    from serve.apidocs import integrity

    client, cfg = app()
    for path in DOC_PAGES:
        r = client.get(path)
        assert r.status_code == 200, r.text
        policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'", policy
        assert "http" not in r.text and "//" not in r.text, r.text  # no other origin, not even scheme-relative
        tags = re.findall(r'(?:src|href)="([^"]+)"(?: integrity="([^"]+)")?', r.text)
        scripts = [(url, sri) for url, sri in tags if not url.endswith(".png")]
        assert scripts and all(url.startswith("/docs/assets/") for url, _ in tags), tags
        for url, sri in scripts:  # each file is named with its integrity hash, and is that file
            body = client.get(url)
            assert body.status_code == 200 and sri == integrity(body.content), url
    assert client.get("/docs/assets/../../common/config.py").status_code == 404
    assert error_of_status(client.get("/docs/assets/nope.js"), 404)["code"] == "not_found"
    locked, _ = app(auth=True)
    for path in (*DOC_PAGES, "/docs/assets/swagger-ui-bundle.js"):
        assert error_of_status(locked.get(path), 401)["code"] == "missing_api_key"


def error_of_status(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_changed_doc_files_are_refused(monkeypatch):
    from serve import apidocs

    apidocs.assets.cache_clear()
    monkeypatch.setitem(apidocs.PINNED, "swagger-ui.css", "0" * 64)
    try:
        with pytest.raises(apidocs.AssetsChanged, match="swagger-ui.css is not the pinned file"):
            apidocs.assets()
    finally:
        apidocs.assets.cache_clear()


def test_the_api_docs_render_in_a_browser_under_their_csp():
    """Swagger UI and ReDoc draw the API's operations with the policy on, and nothing the page asks
    of another origin is fetched (ReDoc's logo is asked of its CDN and blocked)."""
    import shutil
    import socket
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI

    from serve.apidocs import ROUTES
    from serve.routes import TITLE, make_app

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `make test` installs it (the test extras)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is missing: `make test` installs Debian's chromium")
    schema = make_app().openapi()
    site = FastAPI(title=TITLE, docs_url=None, redoc_url=None, openapi_url=None)  # the pages without admission
    for path, methods, endpoint, options in ROUTES.routes:
        site.add_api_route(path, endpoint, methods=methods, **options)
    site.add_api_route("/openapi.json", lambda: schema, methods=["GET"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(site, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                for path, operations in (("/docs", ".opblock"), ("/redoc", "[data-section-id^='operation/']")):
                    page = browser.new_page()
                    done, errors = [], []
                    page.on("requestfinished", lambda r: done.append(r.url))
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    page.goto(base + path)
                    page.wait_for_selector(operations, state="attached", timeout=60_000)  # a bound for a busy machine
                    assert page.locator(operations).count() >= 5, path
                    assert not errors, errors
                    assert all(u.startswith((base, "blob:")) for u in done), done
            finally:
                browser.close()
    finally:
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# a response_format schema is bounded before any compile, compiled once, and its compile is time-limited

FAST = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}}, "required": ["city"]}
# two strings with length bounds: several seconds of xgrammar on 2 CPU cores (1-2 s on a fast machine)
SLOW = {"type": "object", "properties": {"a": {"type": "string", "minLength": 1, "maxLength": 4096},
                                         "b": {"type": "string", "minLength": 2, "maxLength": 4095}}}


def nested(depth: int) -> dict:
    d: dict = {"type": "string"}
    for _ in range(depth):
        d = {"type": "array", "items": d}
    return d


@pytest.mark.parametrize(("schema", "bound"), [
    (nested(40), "more than 32 deep"),
    ({"enum": list(range(1200))}, "more than 1000 JSON values"),
    ({"type": "integer", "minimum": -10**30}, "minimum="),
    ({"type": "number", "maximum": 1e300}, "maximum="),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 10**6}, "maxItems=1000000"),
    ({"type": "string", "maxLength": 100_000}, "maxLength=100000"),
    ({"type": "object", "properties": {f"s{i}": {"type": "string", "maxLength": 10 + i} for i in range(5)}},
     "more than 4 strings"),
    ({"type": "string", "pattern": "^a{0,1000}$"}, "pattern repeat {0,1000}"),
    ({"type": "string", "pattern": "a" * 300}, "at most 256 characters"),
    ({"anyOf": [{"type": "string", "pattern": f"^x{i}$"} for i in range(9)]}, "more than 8 patterns"),
])
def test_a_schema_over_a_bound_is_refused_naming_it(schema, bound):
    from pydantic import ValidationError

    body = chat_body(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    with pytest.raises(ValidationError, match=re.escape(bound)):
        ChatRequest(**body)


def test_a_schema_over_a_bound_is_a_400_over_http(app):
    client, _ = app()
    body = chat_body(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": nested(40)}})
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "more than 32 deep" in r.json()["error"]["message"], r.text
    # a property called like a keyword is a name, not a bound; a realistic schema passes
    ok = {"type": "object", "properties": {"maxLength": {"type": "integer", "minimum": 0, "maximum": 10}}}
    ChatRequest(**chat_body(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": ok}}))


@pytest.fixture(scope="module")
def tokenizer(app_config, provisioned):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(app_config.models.location("generator"))


def test_a_schema_is_compiled_once_by_its_hash_and_a_slow_one_is_killed_and_refused(tokenizer):
    import os

    from deployments.errors import StageError
    from deployments.schemas import SLOW_VERDICT_TTL_S, SchemaGate, canonical

    gate = SchemaGate(tokenizer, timeout_s=0.5, cache_size=8)
    try:
        spec = asyncio.run(gate.check(FAST))
        assert spec == canonical(FAST) and json.loads(spec) == FAST and gate.compiles == 1
        reordered = dict(reversed(list(FAST.items())))
        assert asyncio.run(gate.check(reordered)) == spec and gate.compiles == 1  # the same sha256: no compile
        worker = gate.pid
        with pytest.raises(StageError) as e:
            asyncio.run(gate.check(SLOW))
        assert e.value.kind == "invalid" and "did not compile within 0.5 s" in str(e.value)
        assert "generator.schema_compile_timeout_s" in str(e.value)
        assert gate.pid is None and not os.path.exists(f"/proc/{worker}/status") or _zombie(worker)
        with pytest.raises(StageError, match="did not compile"):
            asyncio.run(gate.check(SLOW))  # refused from the cache
        assert gate.compiles == 2
        # "too slow" is kept for SLOW_VERDICT_TTL_S only (the machine may have been busy): then tried again
        gate.slow.expire(time.monotonic() + SLOW_VERDICT_TTL_S + 1)
        with pytest.raises(StageError, match="did not compile"):
            asyncio.run(gate.check(SLOW))
        assert gate.compiles == 3
        with pytest.raises(StageError, match="cannot be compiled") as e:  # a fresh worker answers
            asyncio.run(gate.check({"type": "integer", "minimum": -1e30}))
        assert "json_schema_converter" not in str(e.value) and gate.compiles == 4
        # a schema that would wait behind compiles for longer than QUEUE_WAITS limits is told to retry
        assert gate._serial.acquire()
        try:
            with pytest.raises(StageError) as e:
                asyncio.run(gate.check({"type": "string", "maxLength": 7}))
            assert e.value.kind == "overloaded" and gate.compiles == 4
        finally:
            gate._serial.release()
    finally:
        gate.close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" in f.read()
    except FileNotFoundError:
        return True


class Capturing:
    """Just enough of vLLM's AsyncLLM for EngineGenerator: records the sampling params it is given."""

    def __init__(self):
        self.params = []

    async def generate(self, inputs, params, request_id):
        self.params.append(params)
        out = type("O", (), {"token_ids": [1], "text": "{}", "finish_reason": "stop", "logprobs": None})()
        yield type("R", (), {"outputs": [out], "finished": True, "metrics": None})()


def test_the_engine_gets_the_canonical_schema_and_never_a_refused_one(tokenizer):
    from deployments.engine import EngineGenerator, GenRequest
    from deployments.errors import StageError
    from deployments.schemas import SchemaGate, canonical

    engine = Capturing()
    gate = SchemaGate(tokenizer, timeout_s=0.5)
    gen = EngineGenerator(engine, tokenizer, schemas=gate)
    msgs = [{"role": "user", "content": "The capital of France as JSON."}]

    async def run(schema):
        return [d async for d in gen.generate(GenRequest(messages=msgs, max_tokens=8, json_schema=schema))]

    try:
        assert asyncio.run(run(FAST))[-1].finish_reason == "stop"
        assert engine.params[-1].structured_outputs.json == canonical(FAST)
        with pytest.raises(StageError, match="cannot be compiled"):
            asyncio.run(run({"type": "integer", "minimum": -1e30}))
        assert len(engine.params) == 1  # the refused schema never reached the engine
    finally:
        gate.close()
