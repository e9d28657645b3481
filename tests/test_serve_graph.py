"""The serving graph end to end: real Ray Serve, real vLLM CPU engine, real indexes.

One deployment for the whole module (cold start about a minute): the test corpus plus a fact found
nowhere else, the retriever on 2 replicas, the index re-read every 0.5 s.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CORPUS, write_corpus

FACT_DOC = "team/winemaker.md"
FACT = "# Our team\n\nThe head winemaker of the estate is Marguerite Okonkwo, who joined the winery in 2009."
NEW_DOC = "team/cellar.md"
NEW_FACT = "# Cellar\n\nThe cellar master is Ilse Vandenberghe; she runs the barrel room."
PORT = 8123


@dataclass
class Service:
    url: str
    cfg: object
    source: Path
    root: Path
    cold_start: float
    not_ready: list | None = None


KEYS: dict[str, str] = {}  # name -> API key, made by the fixture: the graph runs with auth on


def http(method: str, url: str, body=None, headers=None, timeout: float = 120, key: str | None = "admin"):
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    auth = {"Authorization": f"Bearer {KEYS[key]}"} if key in KEYS else {}
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **auth, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def service(tmp_path_factory, local_cfg, provisioned):
    import ray
    from ray import serve

    from indexing.jobs import index_source
    from common.config import AppConfig
    from serve.launch import deploy

    base = tmp_path_factory.mktemp("graph")
    source = write_corpus(base / "src", {**CORPUS, FACT_DOC: FACT})
    root = base / "index"  # empty: the graph starts without an index, reports it, then picks it up
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(root)
    data["retriever"]["reload_interval_s"] = 0.5
    data["retriever"]["deployment"].update(min_replicas=2, max_replicas=2)
    data["http"]["port"] = PORT
    data["http"]["ready_timeout_s"] = 300
    # The reranker stage on its own replica. No trained cross-encoder ships in a package, so the
    # packaged MiniLM gets an untrained scoring head: this exercises the stage (wiring, batching,
    # scores), not ranking quality; the fact tests below therefore ask for rerank: false.
    data["reranker"] = {"enabled": True, "model": str(provisioned["embedder"]), "top_k": 10, "candidates": 20}
    data["router"] = {"domains": {"wine": {"keywords": ["wine", "red"], "related": ["club"]}, "club": {"keywords": ["member"]}}}
    # Production-like admission: auth on, an admin key for the tests (its own generous limits), and a
    # key held to 2 searches a minute. Short answers keep the schema fuzzing bounded.
    data["governor"]["auth"] = {"enabled": True}
    data["governor"]["db"] = str(base / "governor.sqlite3")
    data["generator"].update(max_tokens=48, max_tokens_limit=64)
    from conftest import keys_at

    keys = keys_at(data["governor"]["db"])
    KEYS["admin"] = keys.create("graph tests", "admin", chat_per_min=10**5, search_per_min=10**5, other_per_min=10**5)[0]
    KEYS["slow"] = keys.create("slow", search_per_min=2)[0]
    cfg = AppConfig.model_validate(data)
    seen_not_ready: list[dict] = []

    def index_once_not_ready_is_reported() -> None:
        url = f"http://127.0.0.1:{PORT}/health/ready"
        try:
            for _ in range(600):
                try:
                    code, _, raw = http("GET", url, timeout=10) if _listening() else (0, {}, b"")
                    body = json.loads(raw) if code == 503 else {}
                except (ValueError, OSError):  # the proxy's own 503/404 text before the app exists
                    body = {}
                if "no index" in (body.get("checks") or {}).get("index", ""):
                    seen_not_ready.append(body)
                    break
                time.sleep(0.5)
        finally:
            index_source(local_cfg, source, root, log=lambda _: None)

    indexer = threading.Thread(target=index_once_not_ready_is_reported, daemon=True)
    indexer.start()
    took = deploy(cfg, progress=lambda m: print(m, flush=True))
    indexer.join()
    print(f"cold start (until /health/ready = 200, indexing included): {took:.1f} s")
    service = Service(f"http://127.0.0.1:{PORT}", cfg, source, root, took)
    service.not_ready = seen_not_ready
    yield service
    serve.shutdown()
    ray.shutdown()


def _listening() -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", PORT)) == 0


@pytest.fixture(scope="module")
def client(service):
    import openai

    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=KEYS["admin"], max_retries=0, timeout=120)


def test_not_ready_without_an_index_then_ready(service):
    assert service.not_ready, "/health/ready never said the index was missing"
    body = service.not_ready[0]
    assert body["status"] == "not_ready" and "ragraph index" in body["checks"]["index"]


def test_ready_health_models(service):
    code, _, body = http("GET", f"{service.url}/health/ready")
    checks = json.loads(body)["checks"]
    assert code == 200 and set(checks) >= {"ingress", "router", "retriever", "generator", "index"}
    assert all(v == "ok" for v in checks.values())
    assert http("GET", f"{service.url}/health")[0] == 200
    models = json.loads(http("GET", f"{service.url}/v1/models")[2])
    assert [m["id"] for m in models["data"]] == ["ragraph"]


def test_openai_create_answers_from_the_corpus(client):
    r = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "Who is the head winemaker of the estate?"}], max_tokens=60,
        extra_body={"rag": {"rerank": False}},
    )
    text = r.choices[0].message.content
    assert "Okonkwo" in text, text
    rag = r.model_extra["rag"]
    assert FACT_DOC in [s["document_id"] for s in rag["sources"]]
    assert all(set(s) >= {"document_id", "title", "excerpt", "relevance_score", "source"} for s in rag["sources"])
    assert "reranker" not in rag["metadata"]["timings_ms"]
    meta = rag["metadata"]
    assert meta["status"] == "ok" and meta["index_version"] and meta["model"] == "ragraph" and not meta["cached"]
    assert {"router", "retriever", "generator", "total"} <= set(meta["timings_ms"])
    assert r.usage.completion_tokens > 0 and meta["tokens"]["completion_tokens"] == r.usage.completion_tokens
    cited = [s for s in rag["sources"] if s["cited"]]
    assert cited and all(f"[{s['index']}]" in text or ", " in text for s in cited)
    assert all(1 <= int(n) <= len(rag["sources"]) for group in re.findall(r"\[([\d, ]+)\]", text) for n in group.split(","))


def test_openai_stream_answers_and_final_chunk_has_sources(client):
    stream = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "Who is the head winemaker of the estate?"}],
        max_tokens=60, stream=True, extra_body={"rag": {"rerank": False, "cache": False}},  # asked above: not from the cache
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Okonkwo" in text, text
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    final = chunks[-1].model_extra["rag"]
    assert FACT_DOC in [s["document_id"] for s in final["sources"]]
    assert all("rag" not in (c.model_extra or {}) for c in chunks[:-1])


def test_plain_chat_without_rag(client):
    r = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        max_tokens=20, temperature=0, extra_body={"rag": {"enabled": False}},
    )
    assert "Paris" in r.choices[0].message.content
    assert r.model_extra["rag"]["sources"] == []


def test_openai_sdk_json_mode_logprobs_and_the_fields_clients_send(client):
    """What the openai SDK sends beyond model and messages is accepted, and honoured where the engine can."""
    r = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "Give the capital of France as JSON with the key city."}],
        max_tokens=40, temperature=0, response_format={"type": "json_object"}, user="u-1", metadata={"team": "a"},
        store=False, service_tier="auto", seed=7, extra_body={"rag": {"enabled": False}},
    )
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    assert "[" not in text.split("}")[-1]  # no citation marker appended to a JSON answer
    r = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, extra_body={"rag": {"enabled": False}},
    )
    content = r.choices[0].logprobs.content
    assert content and all(t.logprob <= 0 and 1 <= len(t.top_logprobs) <= 2 for t in content)
    stream = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "What is the capital of France? Answer briefly."}],
        max_tokens=8, temperature=0, logprobs=True, stream=True, extra_body={"rag": {"enabled": False}},
    )
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed and all(t.logprob <= 0 for t in streamed)
    r = client.chat.completions.create(  # a tool-using client's history: assistant content null, a tool message
        model="ragraph", max_tokens=16, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        tool_choice="auto", parallel_tool_calls=False,
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"},
                  {"role": "user", "content": "What did the tool say?"}],
        extra_body={"rag": {"enabled": False}},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    import openai

    with pytest.raises(openai.BadRequestError) as e:  # would change the answer and cannot be honoured
        client.chat.completions.create(model="ragraph", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                       tool_choice="required")
    assert "tool_choice" in e.value.body["message"]


def test_langchain_chat_openai_invoke_and_stream(service):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{service.url}/v1", api_key=KEYS["admin"], model="ragraph", max_tokens=60,
                     temperature=0, max_retries=0, extra_body={"rag": {"rerank": False}})
    answer = llm.invoke("Who is the head winemaker of the estate?")
    assert "Okonkwo" in answer.content, answer.content
    fresh = llm.model_copy(update={"extra_body": {"rag": {"rerank": False, "cache": False}}})  # not from the cache
    chunks = list(fresh.stream("Who is the head winemaker of the estate?"))
    assert len([c for c in chunks if c.content]) > 3
    assert "Okonkwo" in "".join(c.content for c in chunks)
    plain = ChatOpenAI(base_url=f"{service.url}/v1", api_key=KEYS["admin"], model="ragraph", max_tokens=8,
                       logprobs=False, max_retries=0)  # some LangChain versions send logprobs: false on every call
    assert plain.invoke("hello").content is not None


def test_vllm_bench_serve_runs_against_the_endpoint(service, provisioned, tmp_path):
    """vLLM's own serving benchmark (openai-chat backend, ignore_eos) gets no 400 from us."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "load_tests/vllm_bench.py", "--backend", "openai-chat",
         "--base-url", service.url, "--endpoint", "/v1/chat/completions", "--model", "ragraph",
         "--tokenizer", str(provisioned["generator"]), "--dataset-name", "random", "--random-input-len", "32",
         "--random-output-len", "8", "--num-prompts", "4", "--max-concurrency", "2", "--ignore-eos",
         "--save-result", "--result-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OPENAI_API_KEY": KEYS["admin"]},
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [result] = list(tmp_path.glob("*.json"))
    data = json.loads(result.read_text())
    assert data["completed"] == 4 and data.get("failed", 0) == 0, data
    assert data["total_output_tokens"] == 4 * 8  # ignore_eos honoured: every answer ran to its length


def test_unknown_model_is_404_in_openai_format(client):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "ragraph" in e.value.body["message"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        (b"{not json", None, "not valid JSON"),
        ({"model": "ragraph"}, "messages", "required"),
        ({"model": "ragraph", "messages": []}, "messages", "at least 1"),
        ({"model": "ragraph", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'system'"),
        ({"model": "ragraph", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature", "less than or equal to 2"),
        ({"model": "ragraph", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"model": "ragraph", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99999}, "max_tokens", "<= 64"),
        ({"model": "ragraph", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate", "unrecognized"),
        ({"model": "ragraph", "messages": [{"role": "assistant", "content": "hi"}]}, None, "role 'user'"),
        ({"model": "ragraph", "messages": [{"role": "user", "content": "  "}]}, None, "empty"),
    ],
)
def test_bad_bodies_get_4xx_in_openai_format(service, body, param, words):
    code, headers, raw = http("POST", f"{service.url}/v1/chat/completions", body)
    assert code == 400
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert words in err["message"], err["message"]
    if param:
        assert err["param"] == param
    assert headers.get("x-request-id")


def test_request_id_is_echoed_and_logged_by_every_stage(service):
    rid = f"test-rid-{int(time.time())}"
    code, headers, raw = http(
        "POST", f"{service.url}/v1/chat/completions",
        {"model": "ragraph", "messages": [{"role": "user", "content": "Is parking free?"}], "max_tokens": 8},
        headers={"X-Request-ID": rid},
    )
    assert code == 200 and headers["x-request-id"] == rid
    assert json.loads(raw)["rag"]["metadata"]["request_id"] == rid
    code, headers, _ = http("GET", f"{service.url}/health")
    assert len(headers["x-request-id"]) >= 16  # a new one when the client sends none
    logs = Path("/tmp/ray/session_latest/logs/serve")
    seen: set[str] = set()
    deadline = time.time() + 15
    stages = {"ragraph_ingress", "ragraph_router", "ragraph_retriever", "ragraph_generator"}
    while time.time() < deadline and not stages <= seen:
        for f in logs.glob("replica_ragraph_*.log"):
            for line in f.read_text(errors="replace").splitlines():
                if rid in line:
                    entry = json.loads(line)  # JSON logs
                    assert entry["request_id"] == rid
                    seen.add(entry["deployment"])
        time.sleep(1)
    assert stages <= seen, seen


def _metric(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_two_retriever_replicas_share_the_load_and_metrics_count_them(service):
    before = _metric(http("GET", f"{service.url}/metrics")[2].decode(), "rag_stage_requests_total")
    queries = [f"query number {i} about parking and wine" for i in range(40)]
    with cf.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda q: http("POST", f"{service.url}/v1/search", {"query": q, "top_k": 3}), queries))
    assert all(code == 200 for code, _, _ in replies)
    replicas = {json.loads(raw)["metadata"]["replicas"]["retriever"] for _, _, raw in replies}
    assert len(replicas) == 2, replicas
    text = http("GET", f"{service.url}/metrics")[2].decode()
    after = _metric(text, "rag_stage_requests_total")
    counted = {k: v - before.get(k, 0) for k, v in after.items() if 'stage="retriever"' in k}
    assert sum(counted.values()) == 40 and sum(1 for v in counted.values() if v > 0) == 2, counted
    for name in ("rag_http_requests_total", "rag_http_request_duration_seconds", "rag_retrieval_duration_seconds",
                 "rag_generation_duration_seconds", "rag_generation_tokens_total", "rag_pipeline_errors_total",
                 "rag_stage_duration_seconds", "rag_stage_inflight"):
        assert f"# TYPE {name}" in text or f"# HELP {name}" in text, name


def test_http_counters_count_every_routed_request(service):
    """Serve's class-based ingress skips FastAPI middleware: the counter lives in the route class."""
    def count(text: str, status: str) -> float:
        return sum(v for k, v in _metric(text, "rag_http_requests_total").items()
                   if 'endpoint="/v1/search"' in k and f'status="{status}"' in k)

    text = http("GET", f"{service.url}/metrics")[2].decode()
    ok, bad = count(text, "200"), count(text, "400")
    for _ in range(3):
        assert http("POST", f"{service.url}/v1/search", {"query": "parking"})[0] == 200
    assert http("POST", f"{service.url}/v1/search", {"query": "  "})[0] == 400
    text = http("GET", f"{service.url}/metrics")[2].decode()
    assert (count(text, "200") - ok, count(text, "400") - bad) == (3, 1)


def test_loadtest_against_the_graph_agrees_with_the_server(service, tmp_path):
    from cli.main import main

    rc = main(["loadtest", "--url", service.url, "--api-key", KEYS["admin"], "--mode", "open", "--rate", "2", "--duration", "6",
               "--max-tokens", "8", "--mix", "chat=1,stream=1,search=1,multiturn=1", "--seed", "3", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("p50_ms", "p95_ms", "p99_ms", "ttft_p50_ms", "throughput_rps", "output_tokens_per_s", "errors"):
        assert key in report, key
    assert report["requests"] >= 4 and report["ok"] == report["requests"] and report["errors"] == {}
    assert report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["output_tokens_per_s"] > 0 and report["throughput_rps"] > 0
    samples = report["samples"]
    streamed = [s for s in samples if s["kind"] == "stream"]
    assert streamed and all(s["ttft_ms"] and s["ttft_ms"] <= s["e2e_ms"] and s["output_tokens"] > 0 for s in streamed)
    assert all("retriever" in s["stages_ms"] for s in samples)
    assert all(r["agree"] for r in report["cross_check"]["rows"].values()), report["cross_check"]
    assert {p.name for p in tmp_path.glob("*.png")} >= {"latency_vs_load.png", "ttft.png", "stages.png"}


def test_search_scores_and_filters(service):
    code, _, raw = http("POST", f"{service.url}/v1/search", {"query": "which red wines?", "filters": {"domains": ["club"]}})
    assert code == 200
    out = json.loads(raw)
    assert out["results"] and {r["domain"] for r in out["results"]} == {"club"}
    assert {"bm25", "dense"} <= set(out["results"][0]["scores"]) and "retriever" in out["metadata"]["timings_ms"]


def test_reranker_stage_rescores_search_and_chat(service, client):
    code, _, raw = http("POST", f"{service.url}/v1/search", {"query": "is parking free?", "top_k": 3, "rerank": True})
    assert code == 200
    out = json.loads(raw)
    assert len(out["results"]) == 3 and all("rerank" in r["scores"] for r in out["results"])
    assert [r["relevance_score"] for r in out["results"]] == sorted((r["relevance_score"] for r in out["results"]), reverse=True)
    assert "reranker" in out["metadata"]["timings_ms"] and out["metadata"]["replicas"]["reranker"]
    r = client.chat.completions.create(model="ragraph", messages=[{"role": "user", "content": "Is parking free?"}], max_tokens=8)
    assert "reranker" in r.model_extra["rag"]["metadata"]["timings_ms"]


def test_router_domains_reach_the_retriever(client):
    r = client.chat.completions.create(
        model="ragraph", messages=[{"role": "user", "content": "Which red wine do you age in oak?"}], max_tokens=8,
        extra_body={"rag": {"rerank": False}},
    )
    meta = r.model_extra["rag"]["metadata"]
    assert meta["route"]["domains"] == ["wine", "club"]
    assert {s["domain"] for s in r.model_extra["rag"]["sources"]} <= {"wine", "club"}


def test_graph_publishes_the_shared_openapi_schema(service):
    from serve.routes import make_app

    code, _, raw = http("GET", f"{service.url}/openapi.json")
    got, want = json.loads(raw), json.loads(json.dumps(make_app().openapi()))
    assert code == 200
    assert sorted(got["paths"]) == sorted(want["paths"])
    differ = [p for p in want["paths"] if got["paths"][p] != want["paths"][p]]
    assert not differ, [(p, got["paths"][p], want["paths"][p]) for p in differ][:1]
    assert got == want


def test_chat_cli_prints_answer_and_sources(service, monkeypatch):
    import io

    from cli.client import chat

    monkeypatch.setenv("RAGRAPH_API_KEY", KEYS["admin"])

    out = io.StringIO()
    assert chat("Who is the head winemaker of the estate?", url=service.url, max_tokens=40, out=out, rerank=False) == 0
    text = out.getvalue()
    assert "Sources:" in text and FACT_DOC in text


def test_index_swap_under_load_drops_nothing(service):
    from indexing.jobs import index_source
    from indexing.store import current_name

    old = current_name(service.root)
    stop = threading.Event()
    results: list[tuple[int, str | None, bool]] = []

    def hammer(i: int) -> None:
        while not stop.is_set():
            if i == 0:
                code, _, raw = http("POST", f"{service.url}/v1/chat/completions",
                                    {"model": "ragraph", "max_tokens": 4, "rag": {"rerank": False},
                                     "messages": [{"role": "user", "content": "Who is the cellar master?"}]})
                body = json.loads(raw)
                results.append((code, body.get("rag", {}).get("metadata", {}).get("index_version"), False))
            else:
                code, _, raw = http("POST", f"{service.url}/v1/search", {"query": "Who is the cellar master?", "top_k": 3, "rerank": False})
                body = json.loads(raw)
                found = code == 200 and any(r["document_id"] == NEW_DOC for r in body["results"])
                results.append((code, body.get("metadata", {}).get("index_version"), found))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(2)
    write_corpus(service.source, {NEW_DOC: NEW_FACT})
    index_source(service.cfg, service.source, service.root, log=lambda _: None)
    new = current_name(service.root)
    deadline = time.time() + 30
    while time.time() < deadline and not any(v == new for _, v, _ in results[-10:]):
        time.sleep(0.5)
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    codes = [c for c, _, _ in results]
    assert new != old and len(results) > 20
    assert codes.count(200) == len(codes), {c: codes.count(c) for c in set(codes)}
    versions = [v for _, v, _ in results]
    assert old in versions and new in versions
    assert versions.index(new) > versions.index(old)
    assert results[-1][1] == new and any(found for _, v, found in results if v == new)
    assert not any(found for _, v, found in results if v == old)


RYW_DOC = "team/beekeeper.md"
RYW_TEXT = ("# Beekeeper\n\nThe estate beekeeper Zoltanne Pryderi-Vasquez keeps thirty hives of carniolan bees "
            "between the quince orchard and the lower terraces.")
RYW_QUERY = "Zoltanne Pryderi-Vasquez beekeeper carniolan hives quince"


def _wait_job(service, job_id: str, deadline_s: float = 600) -> dict:
    """Poll GET /v1/jobs/{id} until the job ends (the deadline only stops a hung test)."""
    end = time.monotonic() + deadline_s
    while True:
        code, _, raw = http("GET", f"{service.url}/v1/jobs/{job_id}")
        assert code == 200, raw[:300]
        job = json.loads(raw)
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < end, f"job {job_id} still {job['status']}: {job}"
        time.sleep(0.2)


def _search_everywhere(service, n: int = 12) -> list[dict]:
    """``n`` searches for RYW_QUERY at once (both retriever replicas answer some): each reply's
    document ids, index version and retriever replica."""
    def one(_):
        code, _, raw = http("POST", f"{service.url}/v1/search", {"query": RYW_QUERY, "top_k": 5, "rerank": False})
        assert code == 200, raw[:300]
        body = json.loads(raw)
        return {"ids": [r["document_id"] for r in body["results"]], "version": body["metadata"]["index_version"],
                "replica": body["metadata"]["replicas"]["retriever"]}

    with cf.ThreadPoolExecutor(6) as pool:
        return list(pool.map(one, range(n)))


def test_read_your_writes_over_http(service):
    """An upload through POST /v1/documents is searchable as soon as its job says succeeded, on every
    retriever replica (the job waits until each serves the version it published, documents.
    serving_timeout_s); a delete likewise: once its job succeeded no replica finds the document."""
    code, headers, raw = http("POST", f"{service.url}/v1/documents",
                              {"documents": [{"id": RYW_DOC, "title": "Beekeeper", "text": RYW_TEXT}]})
    assert code == 202, raw[:300]
    job = _wait_job(service, json.loads(raw)["job_id"])
    assert job["status"] == "succeeded" and job["result"]["added"] == [RYW_DOC], job
    version, serving = job["result"]["version"], job["result"]["serving"]
    assert job["result"]["published"] and serving["replicas"] == 2 and serving["lagging"] == [], serving
    found = _search_everywhere(service)  # at once: no wait for the retrievers' next poll
    print(f"\nupload: served by every replica {serving['waited_s']} s after publishing; "
          f"replicas searched: {sorted({f['replica'] for f in found})}")
    assert all(RYW_DOC in f["ids"] and f["version"] == version for f in found), found

    code, _, raw = http("DELETE", f"{service.url}/v1/documents/{RYW_DOC}")
    assert code == 202, raw[:300]
    job = _wait_job(service, json.loads(raw)["job_id"])
    assert job["status"] == "succeeded" and job["result"]["removed"] == [RYW_DOC], job
    gone_version, serving = job["result"]["version"], job["result"]["serving"]
    assert gone_version != version and serving["replicas"] == 2 and serving["lagging"] == [], job["result"]
    found = _search_everywhere(service)
    assert all(RYW_DOC not in f["ids"] and f["version"] == gone_version for f in found), found


# ---------------------------------------------------------------------------------------------
# admission, cache and usage through the real graph (auth is on in this module)


def test_auth_rate_limit_and_open_health_on_the_graph(service):
    url = service.url
    assert http("GET", f"{url}/health", key=None)[0] == 200
    assert http("GET", f"{url}/health/ready", key=None)[0] == 200
    code, headers, raw = http("GET", f"{url}/v1/models", key=None)
    assert code == 401 and json.loads(raw)["error"]["code"] == "missing_api_key" and headers["www-authenticate"] == "Bearer"
    code, _, raw = http("POST", f"{url}/v1/search", {"query": "parking"}, key=None,
                        headers={"Authorization": "Bearer rg-00000000.not-a-real-key"})
    assert code == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    codes = [http("POST", f"{url}/v1/search", {"query": "parking"}, key="slow") for _ in range(3)]
    assert [c for c, _, _ in codes] == [200, 200, 429]
    _, headers, raw = codes[-1]
    assert int(headers["retry-after"]) >= 1 and "2 search requests per minute" in json.loads(raw)["error"]["message"]
    time.sleep(1)  # the replicas' log handlers flush
    logs = "".join(f.read_text(errors="replace") for f in Path("/tmp/ray/session_latest/logs/serve").glob("*.log"))
    assert "ingress" in logs and not any(k in logs for k in KEYS.values())  # no key is ever logged


def _raw_request(head: str, *, send_body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """Send ``head`` (request line and headers) and ``send_body`` on a raw socket, then read the
    response: (status, everything read). No body beyond ``send_body`` is ever sent."""
    import socket

    with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + send_body)
        got = b""
        while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 2:
            part = s.recv(65536)
            if not part:
                break
            got += part
    return int(got.split(b" ", 2)[1]), got


def test_no_body_byte_is_read_before_the_key_over_http(service):
    """A keyless upload declaring 30 MiB (under documents.max_upload_bytes) gets its 401 with no
    body byte sent (before, the ingress read the whole body first and the client waited); a user
    key's upload its 403 (the read deadline is tested in process, test_ingress_admission.py)."""
    head = ("POST /v1/documents HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 * 1024 * 1024}\r\n")
    t = time.monotonic()
    status, raw = _raw_request(head)
    assert status == 401 and b"missing_api_key" in raw, raw[:300]
    assert time.monotonic() - t < 10
    from conftest import keys_at

    user = keys_at(service.cfg.governor.db).create("uploader, not admin")[0]
    status, raw = _raw_request(head + f"Authorization: Bearer {user}\r\n")
    assert status == 403 and b"insufficient_scope" in raw, raw[:300]


def test_serve_timeout_overrides_cross_site_and_unknown_proxies_over_http(service):
    url = service.url
    body = {"query": "parking"}
    code, _, raw = http("POST", f"{url}/v1/search", body, headers={"x-request-timeout-seconds": "0"})
    assert code == 400 and json.loads(raw)["error"]["code"] == "header_not_allowed", raw
    code, _, raw = http("DELETE", f"{url}/v1/cache", headers={"Origin": "http://evil.example"})
    assert code == 403 and json.loads(raw)["error"]["code"] == "cross_site_request", raw
    code, _, raw = http("POST", f"{url}/v1/search", body, headers={"Sec-Fetch-Site": "cross-site"})
    assert code == 403 and json.loads(raw)["error"]["code"] == "cross_site_request", raw
    # loopback is in exempt_ips (configs/local.yaml), but not a client relayed by an unknown proxy:
    # the per-address limit of "other" requests (100 a minute) applies to it
    limit = int(service.cfg.governor.rate_limits.per_ip.other)
    codes = [http("GET", f"{url}/v1/models", headers={"X-Forwarded-For": "198.51.100.9"})[0] for _ in range(limit + 1)]
    assert codes[:limit] == [200] * limit and codes[-1] == 429, codes[-5:]
    assert http("GET", f"{url}/v1/models")[0] == 200  # the operator on this machine is still exempt


def test_one_request_id_header_and_metrics_need_a_key_over_http(service):
    from http.client import HTTPConnection

    conn = HTTPConnection("127.0.0.1", PORT, timeout=120)
    chat = {"model": "ragraph", "max_tokens": 4, "rag": {"cache": False},
            "messages": [{"role": "user", "content": "Is parking free?"}]}
    for headers in ({}, {"X-Request-ID": f"one-id-{time.time_ns()}"}):
        conn.request("POST", "/v1/chat/completions", json.dumps(chat), {
            "Content-Type": "application/json", "Authorization": f"Bearer {KEYS['admin']}", **headers})
        r = conn.getresponse()
        body = json.loads(r.read())
        ids = [v for k, v in r.getheaders() if k.lower() == "x-request-id"]
        assert r.status == 200 and ids == [body["rag"]["metadata"]["request_id"]], (ids, r.status)
        if headers:
            assert ids == [headers["X-Request-ID"]]
    conn.request("GET", "/v1/models")  # an error response too
    r = conn.getresponse()
    r.read()
    assert r.status == 401 and len([k for k, _ in r.getheaders() if k.lower() == "x-request-id"]) == 1
    conn.close()
    code, _, raw = http("GET", f"{service.url}/metrics", key=None)
    assert code == 401, raw[:200]
    assert http("GET", f"{service.url}/metrics")[0] == 200  # an admin key
    code, _, text = http("GET", f"{service.url}/metrics")
    assert not re.search(rb"key_id=", text)


def test_cache_hit_and_usage_through_the_graph(service):
    body = {"model": "ragraph", "max_tokens": 16, "rag": {"rerank": False},
            "messages": [{"role": "user", "content": "What do club members receive?"}]}
    before = json.loads(http("GET", f"{service.url}/v1/usage")[2])["day"]
    code, _, first = http("POST", f"{service.url}/v1/chat/completions", body)
    code2, _, again = http("POST", f"{service.url}/v1/chat/completions",
                           {**body, "messages": [{"role": "user", "content": "What do club  members receive"}]})
    first, again = json.loads(first), json.loads(again)
    assert code == code2 == 200 and not first["rag"]["metadata"]["cached"] and again["rag"]["metadata"]["cached"]
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    code, _, bypass = http("POST", f"{service.url}/v1/chat/completions", body, headers={"Cache-Control": "no-cache"})
    assert code == 200 and not json.loads(bypass)["rag"]["metadata"]["cached"]
    stats = json.loads(http("GET", f"{service.url}/v1/cache/stats")[2])
    assert stats["hits"] >= 1 and stats["entries"] >= 1
    metrics = http("GET", f"{service.url}/metrics")[2].decode()
    assert _metric(metrics, "rag_cache_requests_total").get('rag_cache_requests_total{result="hit"}', 0) >= 1
    assert "rag_generator_breaker_state 0.0" in metrics
    deadline = time.time() + 10  # usage is written in the background, after the answer
    while time.time() < deadline:
        day = json.loads(http("GET", f"{service.url}/v1/usage")[2])["day"]
        if day["requests"] >= before["requests"] + 2:
            break
        time.sleep(0.2)
    assert day["requests"] == before["requests"] + 2  # two generations; the cache hit cost nothing
    assert day["completion_tokens"] >= before["completion_tokens"] + first["usage"]["completion_tokens"]
    code, _, raw = http("DELETE", f"{service.url}/v1/cache")
    assert code == 200 and json.loads(raw)["removed"] >= 1


def test_admission_cost_per_request(service):
    """Admission happens in the ingress with the verified key cached (governor.auth.key_cache_s):
    40 admitted requests make no call on the state database (``stage="state"``), but for one
    re-verification if the cached verdict expires meanwhile. /v1/models (admitted) against /health
    (not), side by side, printed for the record (load_tests/README.md), not asserted: timings are
    noisy here."""
    import statistics

    def p50(path: str) -> float:
        times = []
        for _ in range(40):
            t = time.perf_counter()
            assert http("GET", f"{service.url}{path}")[0] == 200
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def state_calls() -> float:
        text = http("GET", f"{service.url}/metrics")[2].decode()
        return _metric(text, "rag_stage_duration_seconds_count").get('rag_stage_duration_seconds_count{stage="state"}', 0)

    p50("/health")
    http("GET", f"{service.url}/v1/models")  # the key is verified (and cached) here, if it was not already
    # Earlier tests' chats record their usage in the state database in the background: wait until no
    # state call is in flight (the count holds still for a second) before counting.
    calls, deadline = state_calls(), time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = state_calls()
        if now == calls:
            break
        calls = now
    health = p50("/health")
    start = time.monotonic()
    models = p50("/v1/models")
    window = time.monotonic() - start
    made = state_calls() - calls
    print(f"\nadmission: /health p50 {health:.1f} ms, /v1/models p50 {models:.1f} ms (+{models - health:.1f} ms); "
          f"state calls for 40 admitted requests: {made:.0f} in {window:.1f} s")
    # A cached verdict lives key_cache_s from when it was fetched (reads do not extend it), and it may
    # have been fetched by an earlier test: within a window shorter than key_cache_s it can expire
    # once, and that one request verifies the key again. Without the cache each request is a call.
    key_cache_s = service.cfg.governor.auth.key_cache_s
    assert window < key_cache_s, f"40 requests took {window:.1f} s, longer than key_cache_s ({key_cache_s} s)"
    assert made <= 1, f"{made:.0f} state calls for 40 requests with a cached key (one expiry allowed)"


def test_schemathesis_finds_no_server_error(service):
    """Fuzz every operation of our OpenAPI schema (valid and invalid inputs, a bounded number of
    examples): no 5xx, and every 4xx says what is wrong in OpenAI's error format."""
    import hypothesis
    import hypothesis.errors
    import schemathesis
    from schemathesis import GenerationMode

    auth = {"Authorization": f"Bearer {KEYS['admin']}"}
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers=auth)  # the docs need a key too
    seen: dict[str, int] = {}
    problems: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        chat = op.path == "/v1/chat/completions"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=op.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=12 if chat else 25, deadline=None, database=None, derandomize=True,
                                 suppress_health_check=list(hypothesis.HealthCheck),
                                 phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            def check(case) -> None:
                r = case.call(base_url=service.url, headers=auth, timeout=120)
                seen[f"{op.method.upper()} {op.path} {r.status_code}"] = seen.get(f"{op.method.upper()} {op.path} {r.status_code}", 0) + 1
                if r.status_code >= 500:
                    problems.append(f"{r.status_code} from {case.as_curl_command()}: {r.text[:300]}")
                elif r.status_code >= 400:
                    try:
                        message = r.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = ""
                    if not message:
                        problems.append(f"{r.status_code} without an error message: {r.text[:200]}")

            try:
                check()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (e.g. GET /health takes no input)
                assert mode == GenerationMode.NEGATIVE, op.path
                seen[f"{op.method.upper()} {op.path} (no invalid input exists)"] = 0
    print("\n" + "\n".join(f"{k}: {v}" for k, v in sorted(seen.items())))
    assert sum(seen.values()) > 150 and any(k.endswith(" 200") for k in seen) and any(" 4" in k for k in seen)
    assert not problems, problems[:5]


# ---------------------------------------------------------------------------------------------
# a real Prometheus against the graph (configs/monitoring/; issue 18 item 3). Last in the module: it
# kills the generator.

BREAKER_ALERT = "RagraphGeneratorBreakerOpen"
# what the dashboard may show empty here, and why (every other query must return data)
MAY_BE_EMPTY = {
    "Retries, degraded answers, stage errors": "no retry, degraded answer or stage error before the fault",
    "Errors per deployment (Serve)": "no replica raised an exception",
    "Usage records lost (never reached the governor)": "Ray's agent has a series only once one was lost (ray_rag_)",
}


def _prom(base: str, path: str, **params) -> dict:
    import urllib.parse

    url = f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
    with urllib.request.urlopen(url, timeout=10) as r:
        out = json.loads(r.read())
    assert out["status"] == "success", out
    return out["data"]


def test_prometheus_scrapes_the_graph_and_the_breaker_alert_fires(service, tmp_path):
    """Debian's Prometheus with configs/monitoring/prometheus.yml (targets pointed at this graph and
    its node's Ray agent, 1 s scrapes and evaluations) and rules.yml (the breaker alert's `for`
    shortened to 2 s): after some traffic every dashboard query returns data (both ``source``
    values: the service's rag_* and the agent's ray_rag_*), then the generator is killed (and its
    replacements, until the breaker opens) and RagraphGeneratorBreakerOpen fires."""
    import shutil
    import socket
    import subprocess

    import ray
    import yaml

    from conftest import keys_at
    from faults.harness import kill_orphans, kill_replica, replica_actors, wait_recovered
    from test_monitoring import DASHBOARD, RULES, SCRAPE, dashboard_queries

    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make test` installs it (apt-get install prometheus)"
    started = time.time()
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in (BREAKER_ALERT, "RagraphStageNoHealthyReplica"):
                rule["for"] = "2s"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    cfg = yaml.safe_load(SCRAPE.read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"ragraph", "ray"}
    node = next(n for n in ray.nodes() if n["Alive"])
    jobs["ragraph"]["static_configs"] = [{"targets": [service.url.removeprefix("http://")]}]
    # /metrics needs a key with auth on: Prometheus scrapes with a key of scope metrics, as the file says
    (tmp_path / "scrape.key").write_text(keys_at(service.cfg.governor.db).create("prometheus", "metrics")[0])
    jobs["ragraph"]["authorization"] = {"credentials_file": str(tmp_path / "scrape.key")}
    jobs["ray"].pop("file_sd_configs")
    jobs["ray"]["static_configs"] = [{"targets": [f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"]}]
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    cfg["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stdout=log, stderr=log)
    killed: list[dict] = []
    stop = threading.Event()
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{prom}/-/ready", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "prometheus.log").read_text()
                time.sleep(0.5)

        # traffic: searches, chats (one streamed), a refused request, a chat by a key with a daily quota
        quota_key = keys_at(service.cfg.governor.db).create("quota", daily_tokens=100_000)[0]
        KEYS["quota"] = quota_key
        chat = {"model": "ragraph", "max_tokens": 16, "rag": {"rerank": False, "cache": False},
                "messages": [{"role": "user", "content": "When is the tasting room open?"}]}
        for i in range(4):
            assert http("POST", f"{service.url}/v1/search", {"query": f"parking {i}", "top_k": 2})[0] == 200
        assert http("POST", f"{service.url}/v1/chat/completions", chat)[0] == 200
        assert http("POST", f"{service.url}/v1/chat/completions", {**chat, "stream": True})[0] == 200
        assert http("POST", f"{service.url}/v1/chat/completions", chat, key="quota")[0] == 200
        cached = {**chat, "rag": {"rerank": False}, "messages": [{"role": "user", "content": "Are gift boxes sold?"}]}
        assert [http("POST", f"{service.url}/v1/chat/completions", cached)[0] for _ in range(2)] == [200, 200]  # a hit
        assert http("GET", f"{service.url}/v1/models", key=None)[0] == 401

        # every dashboard query returns data (polled: the agent's copy is up to 2 s old, rates need 2 scrapes)
        queries = {(src, title, expr) for src in ("rag_", "ray_rag_") for title, expr in dashboard_queries(src, rate="1m")}
        empty: set = set(queries)
        counts: dict = {}
        deadline = time.time() + 90
        while time.time() < deadline:
            for q in sorted(empty):
                n = len(_prom(prom, "/api/v1/query", query=q[2])["result"])
                counts[q] = n
                if n:
                    empty.discard(q)
            if all(title in MAY_BE_EMPTY for _, title, _ in empty):
                break
            time.sleep(2)
        print(f"\ndashboard queries with data: {len(queries) - len(empty)} of {len(queries)}")
        for src, title, expr in sorted(empty):
            print(f"  empty ({src}, allowed: {MAY_BE_EMPTY.get(title)}): {title}: {expr}")
        # asserted at the end, so that one run also shows the fault part
        problems = [f"dashboard query empty ({src}): {title}: {expr}" for src, title, expr in sorted(empty) if title not in MAY_BE_EMPTY]
        assert DASHBOARD.exists()
        up = {r["metric"]["job"]: r["value"][1] for r in _prom(prom, "/api/v1/query", query="up")["result"]}
        if up != {"ragraph": "1", "ray": "1"}:
            problems.append(f"up: {up}")
        # recording rules: polled too (a rule evaluated before its rate's second scrape records nothing yet)
        unrecorded = {"ragraph:http_requests:rate5m", "ragraph:deployment_healthy_replicas", "ragraph:index_published:info",
                      "ragraph:index_serving:info", "ragraph:key_quota_used_ratio:max"}
        deadline = time.time() + 30
        while unrecorded and time.time() < deadline:
            unrecorded = {r for r in unrecorded if not _prom(prom, "/api/v1/query", query=r)["result"]}
            if unrecorded:
                time.sleep(1)
        problems += [f"recording rule without data: {recorded}" for recorded in sorted(unrecorded)]
        state = _prom(prom, "/api/v1/query", query="ragraph:generator_breaker_state:max")["result"]
        assert state and state[0]["value"][1] == "0", state
        assert not [a for a in _prom(prom, "/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == BREAKER_ALERT]

        # the fault: kill the generator, and any replacement until the breaker has opened (a
        # replacement that answered the waiting chats first would close it again); chats meanwhile
        def chatter() -> None:
            while not stop.is_set():
                http("POST", f"{service.url}/v1/chat/completions", chat, timeout=90)

        workers = [threading.Thread(target=chatter, daemon=True) for _ in range(6)]
        for w in workers:
            w.start()
        time.sleep(2)
        killed.append(kill_replica("generator"))
        t0 = killed[0]["killed_at"]
        timeline: dict[str, float] = {}
        firing = None
        while time.monotonic() - t0 < 300:
            state = _prom(prom, "/api/v1/query", query="ragraph:generator_breaker_state:max")["result"]
            value = float(state[0]["value"][1]) if state else 0.0
            if value >= 1 and "breaker not closed in Prometheus" not in timeline:
                timeline["breaker not closed in Prometheus"] = round(time.monotonic() - t0, 1)
            if "breaker not closed in Prometheus" not in timeline:
                gone = {k["actor_id"] for k in killed}
                for a in replica_actors("generator"):
                    if a["actor_id"] not in gone:
                        killed.append(kill_replica("generator", actor_id=a["actor_id"]))
            for a in _prom(prom, "/api/v1/alerts")["alerts"]:
                name = a["labels"]["alertname"]
                key = f"{name} {a['state']}"
                if name in (BREAKER_ALERT, "RagraphStageNoHealthyReplica") and key not in timeline:
                    timeline[key] = round(time.monotonic() - t0, 1)
                if name == BREAKER_ALERT and a["state"] == "firing":
                    firing = a
            if firing is not None:
                break
            time.sleep(0.5)
        stop.set()
        print(f"generator replicas killed: {len(killed)}; seconds after the first kill: {json.dumps(timeline)}")
        assert firing is not None, f"{BREAKER_ALERT} did not fire within 300 s of the kill: {timeline}"
        assert firing["labels"]["severity"] == "critical" and float(firing["value"]) >= 1
        print(f"alert: {json.dumps(firing)}")
        assert not problems, problems
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if killed:  # leave a working generator (and no orphaned vLLM engine) behind
            try:
                took = wait_recovered("generator", {k["actor_id"] for k in killed}, replicas=1, timeout=400,
                                      killed_at=killed[-1]["killed_at"])
                print(f"generator back {took:.0f} s after the last kill")
            except TimeoutError as e:  # the module ends here: reported, the alert was what this test is about
                print(f"WARNING: {e}")
            kill_orphans(since=started)
