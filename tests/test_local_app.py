"""The pipeline in one process without Ray (serve/local.py, the other side of bench_graph.py):
the same routes answer from the same plain classes and the real vLLM engine."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow  # starts a vLLM engine (~40 s on 2 cores)


@pytest.fixture(scope="module")
def client(local_cfg, built_index):
    from fastapi.testclient import TestClient

    from common.config import AppConfig
    from serve.local import create_app

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    # a loopback caller by a loopback name: with auth off the Host check refuses TestClient's "testserver"
    with TestClient(create_app(AppConfig.model_validate(data)), base_url="http://localhost",
                    client=("127.0.0.1", 50000)) as c:
        yield c


def test_chat_answers_with_sources_and_counts_it(client):
    body = {"model": "ragraph", "max_tokens": 24, "messages": [{"role": "user", "content": "Is parking free for visitors?"}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"].strip()
    assert out["rag"]["sources"][0]["document_id"].endswith("hours.md")
    assert out["rag"]["metadata"]["replicas"]["retriever"] == "in-process"
    assert 0 < out["usage"]["completion_tokens"] <= 24
    metrics = client.get("/metrics").text
    assert 'rag_http_requests_total{endpoint="/v1/chat/completions",method="POST",status="200"} 1.0' in metrics


def test_stream_and_search_and_errors(client):
    body = {"model": "ragraph", "max_tokens": 16, "stream": True,
            "messages": [{"role": "user", "content": "Which wines are aged in oak?"}]}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and '"rag"' in lines[-2]
    r = client.post("/v1/search", json={"query": "refund for a broken bottle", "top_k": 2})
    assert r.status_code == 200 and r.json()["results"][0]["document_id"].endswith("returns.md")
    r = client.post("/v1/chat/completions", json={"model": "ragraph", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_publishes_the_shared_schema(client):
    from serve.routes import make_app

    assert client.get("/openapi.json").json() == make_app().openapi()
