"""Issue 17's "must show" items against the real graph (Ray Serve, the vLLM CPU engine, the ingest
jobs in the state database, run by the ingress replica's job runner): an upload under steady load
that is searchable and cited as soon as its job succeeded, then a delete that removes it as
promptly, with no request of the load failing; and a replica killed while a job runs (the ingress,
whose runner holds the job, or a retriever, which the job waits for), the job never lost nor
half-published.

Slow (a graph cold start, about a minute on 2 cores, plus the jobs): run on its own,
``pytest -m slow tests/test_documents_graph.py``. Port 8127."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import indexed_config

pytestmark = pytest.mark.slow

PORT = 8127
KEYS: dict[str, str] = {}
FACT_ID = "team/sommelier.md"
FACT = ("# Sommelier\n\nThe estate sommelier is Wendelin Abernathy-Quist; he leads the Thursday "
        "evening tastings in the vaulted cellar.")


def http(method: str, path: str, body=None, timeout: float = 120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEYS['admin']}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def graph(tmp_path_factory, local_cfg, provisioned):
    import ray
    from ray import serve

    from common.config import AppConfig
    from conftest import keys_at
    from serve.launch import deploy

    base = tmp_path_factory.mktemp("documents-graph")
    data = indexed_config(local_cfg, base)
    root = base / "index"
    data["http"]["port"] = PORT
    data["http"]["ready_timeout_s"] = 300
    data["governor"]["auth"] = {"enabled": True}
    data["governor"]["db"] = str(base / "state" / "governor.sqlite3")
    data["generator"].update(max_tokens=48, max_tokens_limit=64)
    data["documents"].update(stale_after_s=20, poll_interval_s=0.5)
    keys = keys_at(data["governor"]["db"])
    KEYS["admin"] = keys.create("documents graph tests", "admin", chat_per_min=10**5, search_per_min=10**5,
                                other_per_min=10**5)[0]
    cfg = AppConfig.model_validate(data)
    print(f"cold start {deploy(cfg, progress=lambda m: print(m, flush=True)):.1f} s")
    yield cfg, root
    serve.shutdown()
    ray.shutdown()


def wait_job(job_id: str, deadline_s: float = 900) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        code, job = http("GET", f"/v1/jobs/{job_id}")
        if code == 200 and job["status"] in ("succeeded", "failed"):
            return job
        assert code in (200, 503), (code, job)  # 503: no ingress replica yet (the kill test)
        assert time.monotonic() < end, f"job {job_id} did not end: {job}"
        time.sleep(0.5)


def search_ids(query: str) -> list[str]:
    code, body = http("POST", "/v1/search", {"query": query, "top_k": 5, "rerank": False})
    assert code == 200, body
    return [r["document_id"] for r in body["results"]]


def test_upload_search_chat_delete_under_load_fails_no_request(graph):
    stop = threading.Event()
    codes: list[tuple[str, int]] = []

    def load(kind: str) -> None:
        while not stop.is_set():
            if kind == "chat":
                code, _ = http("POST", "/v1/chat/completions", {
                    "model": "ragraph", "max_tokens": 4, "rag": {"rerank": False},
                    "messages": [{"role": "user", "content": "When is the tasting room open?"}]})
            else:
                code, _ = http("POST", "/v1/search", {"query": "red wines oak barrels", "top_k": 3})
            codes.append((kind, code))

    threads = [threading.Thread(target=load, args=(k,)) for k in ("chat", "search", "search")]
    for t in threads:
        t.start()
    try:
        code, accepted = http("POST", "/v1/documents", {"documents": [{"id": FACT_ID, "title": "Sommelier", "text": FACT}]})
        assert code == 202, accepted
        job = wait_job(accepted["job_id"])
        assert job["status"] == "succeeded" and job["result"]["added"] == [FACT_ID], job
        assert job["result"]["serving"]["lagging"] == [], job["result"]  # every retriever serves it: read your writes
        assert FACT_ID in search_ids("who is the estate sommelier"), "not searchable once its job succeeded"
        code, chat = http("POST", "/v1/chat/completions", {
            "model": "ragraph", "max_tokens": 48, "rag": {"rerank": False},
            "messages": [{"role": "user", "content": "Who is the estate sommelier?"}]})
        assert code == 200, chat
        cited = [s for s in chat["rag"]["sources"] if s["cited"]]
        assert any(s["document_id"] == FACT_ID for s in cited), chat["rag"]["sources"]

        code, accepted = http("DELETE", f"/v1/documents/{FACT_ID}")
        assert code == 202, accepted
        job = wait_job(accepted["job_id"])
        assert job["status"] == "succeeded" and job["result"]["removed"] == [FACT_ID], job
        assert job["result"]["serving"]["lagging"] == [], job["result"]
        assert FACT_ID not in search_ids("who is the estate sommelier"), "still searchable once its delete succeeded"
    finally:
        stop.set()
        for t in threads:
            t.join()
    bad = [(k, c) for k, c in codes if c != 200]
    assert len(codes) > 10 and not bad, f"{len(bad)} of {len(codes)} load requests failed: {bad[:10]}"


@pytest.mark.parametrize("victim", ["retriever", "ingress"])
def test_a_killed_replica_never_loses_or_half_publishes_a_job(graph, victim):
    """A retriever holds no job: killing it leaves the job running, and the job succeeds once the
    restarted replica serves its version (the lost one is not waited for). The ingress replica holds
    the job's runner (and its Ray build task): the restarted ingress's runner takes the job over and
    runs it again (or fails it with the reason). Either way the live version holds all of the job's
    documents or none of them."""
    from faults.harness import kill_replica, replica_actors, wait_recovered

    cfg, root = graph
    n = 300
    _, before = http("GET", "/v1/documents?limit=1")
    docs = [{"id": f"{victim}-{i:04d}", "text": f"Batch note {i} from the {victim} test: barrel {i} was racked "
             f"on day {i % 28 + 1} and tasted by panel {i % 7}."} for i in range(n)]
    code, accepted = http("POST", "/v1/documents", {"documents": docs})
    assert code == 202, accepted
    end = time.monotonic() + 300
    while (job := http("GET", f"/v1/jobs/{accepted['job_id']}")[1])["status"] == "queued":
        assert time.monotonic() < end, job
        time.sleep(0.2)
    assert job["status"] == "running", job
    ids = [a["actor_id"] for a in replica_actors(victim)]
    kill_replica(victim)
    wait_recovered(victim, ids, replicas=1, timeout=300)
    job = wait_job(accepted["job_id"])
    _, after = http("GET", "/v1/documents?limit=1")
    if job["status"] == "succeeded":
        assert after["total"] == before["total"] + n, (before["total"], after["total"], job)
        # one run, or run again by the restarted ingress's runner (its "interrupted" note is the queued
        # job's progress message, replaced by the second run's progress)
        assert job["attempts"] == (2 if victim == "ingress" else 1), job
        if job["result"]["published"]:  # (a second run may find the first run's version live: nothing to publish)
            assert job["result"]["serving"]["lagging"] == [], job["result"]
        assert f"{victim}-0007" in search_ids(f"Batch note 7 from the {victim} test barrel 7"), "not searchable"
    else:
        assert victim == "ingress" and "interrupted" in job["error"], job
        assert after["total"] == before["total"], (before["total"], after["total"], job)
    print(f"{victim} killed while job {job['id']} ran: {job['status']} after {job['attempts']} run(s)")
