"""Metrics that add up across ingress replicas: with 2 ingress replicas, after N requests the
counters scraped from ``GET /metrics`` (one replica at random behind the proxy) sum to N, over
several scrapes, never decreasing; and Ray's node agent exports each replica's own series."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from conftest import write_corpus

PORT = 8125
N = 40


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json",
                                                                                "Cache-Control": "no-cache"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status


def searches(text: str) -> float:
    """``rag_http_requests_total`` for 200s of POST /v1/search, summed over the exposition's series."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("rag_http_requests_total{") and 'endpoint="/v1/search"' in line and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def two_ingress(tmp_path_factory, local_cfg):
    import ray
    from ray import serve

    from common.config import AppConfig
    from indexing.jobs import index_source
    from serve.launch import deploy

    base = tmp_path_factory.mktemp("replicas")
    root = base / "index"
    index_source(local_cfg, write_corpus(base / "src"), root, log=lambda _: None)
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(root)
    data["http"]["port"] = PORT
    data["http"]["ready_timeout_s"] = 300
    data["http"]["deployment"].update(min_replicas=2, max_replicas=2)
    data["reranker"]["enabled"] = False
    data["governor"]["cache"] = {"enabled": False}
    deploy(AppConfig.model_validate(data), progress=lambda m: None)
    yield f"http://127.0.0.1:{PORT}"
    serve.shutdown()
    ray.shutdown()


def test_counters_sum_over_two_ingress_replicas(two_ingress):
    import ray

    url = two_ingress
    before = searches(get(f"{url}/metrics"))
    for i in range(N):
        assert post(f"{url}/v1/search", {"query": f"opening hours {i}", "top_k": 2}) == 200
    seen, deadline = [], time.time() + 30
    while time.time() < deadline:
        seen.append(searches(get(f"{url}/metrics")) - before)
        if len(seen) >= 5 and seen[-1] == N:
            break
        time.sleep(0.5)
    assert seen[-1] == N, f"scraped search counts after {N} requests: {seen}"
    assert all(b >= a for a, b in zip(seen, seen[1:])), f"a counter went down between scrapes: {seen}"
    for _ in range(5):  # and it stays put, whichever replica answers the scrape
        assert searches(get(f"{url}/metrics")) - before == N

    # both replicas counted some of them: the node agent holds one series per replica (WorkerId)
    node = next(n for n in ray.nodes() if n["Alive"])
    raw = get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics")
    # (this pytest process is a Ray driver too: series that in-process tests of the same run recorded
    # in it are not a replica's)
    driver = ray.get_runtime_context().get_worker_id()
    workers = {}
    for line in raw.splitlines():
        if line.startswith("ray_rag_http_requests_total") and 'endpoint="/v1/search"' in line and 'status="200"' in line:
            worker = line.split('WorkerId="', 1)[1].split('"', 1)[0]
            if worker != driver:
                workers[worker] = workers.get(worker, 0) + float(line.rsplit(" ", 1)[1])
    assert len(workers) == 2 and all(v > 0 for v in workers.values()), workers
    assert sum(workers.values()) == before + N
