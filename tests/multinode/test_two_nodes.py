"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head plus one worker, each its
own raylet and object store), the serving graph across them, a batch re-index submitted as a Ray
job, and the worker node killed under load.

    pytest tests/multinode -m slow -s

The layout follows cluster.yaml at small scale: the head declares ``ragraph_head`` (the generator
is pinned to it here, as a GPU generator is pinned to GPU nodes), the worker declares ``cpu_pool``.
Ingress, router and retriever run 2 replicas each, which Serve spreads over the two nodes; both
ingress replicas open the one state database (a SQLite file: both nodes are this machine; auth is
off, so the rate-limit counters may stay memory://). Serve's proxy runs on the head only (two proxies on one machine would want the same
port). With ``RAGRAPH_RESULTS_DIR=load_tests/results`` results go to ``multinode.json`` there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import SHARED_DATA, indexed_config, results_file
from faults.harness import SteadyLoad, deployment_state, gcs_replicas, wait_no_orphans
from multinode.cluster import LOOPBACK, loopback_cluster, write_results

pytestmark = pytest.mark.slow
PORT = 8150
DASHBOARD_PORT = 8275
RATE = 3.0  # requests/s, half searches, half 8-token chats (below the 2-core machine's knee)
REPLICATED = ("ingress", "router", "retriever")
REPORT = results_file("multinode.json")  # None: report printed, not written (RAGRAPH_RESULTS_DIR)
RESULTS: dict[str, dict] = {}
BIN = Path(sys.executable).parent
DATASET = SHARED_DATA / "business-reports"


def node_ids() -> dict[str, str]:
    """node id -> 'head' | 'worker' for the ALIVE nodes (the head declares ragraph_head)."""
    import ray

    return {n["NodeID"]: "head" if "ragraph_head" in n["Resources"] else "worker" for n in ray.nodes() if n["Alive"]}


def placement() -> dict[str, list[str]]:
    """deployment -> the role ('head' / 'worker') of each ALIVE replica's node, from one read of the
    GCS actor table (a poll that lists actors per deployment through the dashboard takes enough CPU
    on 2 cores to slow the generator down)."""
    roles, alive = node_ids(), gcs_replicas()
    return {d: sorted(roles.get(a["node_id"], "dead") for a in alive.get(d, []))
            for d in (*REPLICATED, "generator")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, local_cfg, provisioned):
    """A 2-node Ray cluster with the graph deployed; the worker node can be killed by the tests."""
    from common.config import AppConfig
    from serve.launch import deploy

    started = time.time()
    base = tmp_path_factory.mktemp("multinode")
    data = indexed_config(local_cfg, base)
    root = base / "index"
    for stage in ("http", "router", "retriever"):  # http: the ingress
        data[stage]["deployment"].update(min_replicas=2, max_replicas=2, num_cpus=0.1, health_check_period_s=2)
    data["generator"]["deployment"].update(health_check_period_s=2, resources={"ragraph_head": 0.01})
    data["http"].update(port=PORT, proxy_location="HeadOnly")
    data["http"]["timeouts"]["generator_first_token"] = 10
    data["governor"]["db"] = str(base / "governor.sqlite3")
    data["reranker"]["enabled"] = False
    cfg = AppConfig.model_validate(data)
    env = {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # the job's `ragraph` is this venv's
    with loopback_cluster(env=env, dashboard_port=DASHBOARD_PORT) as (c, worker):
        took = deploy(cfg, address=c.address, progress=lambda m: print(m, flush=True))
        print(f"cold start on 2 nodes {took:.0f} s; replicas: {placement()}")
        RESULTS["cold_start_s"] = {"value": round(took, 1)}
        yield {"cluster": c, "worker": worker, "cfg": cfg, "root": root, "url": f"http://127.0.0.1:{PORT}",
               "dashboard": f"http://127.0.0.1:{DASHBOARD_PORT}"}
    orphans = wait_no_orphans(since=started)
    write_results(REPORT, RESULTS, RATE)
    assert not orphans, f"vLLM processes outlived the cluster: {orphans}"


def search(url: str, query: str) -> dict:
    r = httpx.post(f"{url}/v1/search", json={"query": query, "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_replicas_are_spread_over_both_nodes(cluster):
    where = placement()
    for d in REPLICATED:
        assert where[d] == ["head", "worker"], where  # one replica per node: a lost node leaves one
    assert where["generator"] == ["head"], where
    assert "governor" not in gcs_replicas(), gcs_replicas().keys()  # no deployment holds the state


def test_reindex_as_a_ray_job_uses_both_nodes_and_goes_live(cluster):
    """`ray job submit -- ragraph index SOURCE`: Ray Data's embedder actors run on both nodes, the new
    version is published, and the serving retrievers (on both nodes) answer from it within seconds."""
    url, root = cluster["url"], cluster["root"]
    question = json.loads((DATASET / "queries.jsonl").read_text().splitlines()[0])["text"]
    before = search(url, question)["metadata"]["index_version"]
    env = {"RAGRAPH__INDEXING__ENGINE": "ray", "RAGRAPH__INDEXING__CONCURRENCY": "2",
           "RAGRAPH__INDEXING__THREADS_PER_ACTOR": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.monotonic()
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"],
         "--runtime-env-json", json.dumps({"env_vars": env}),
         "--", "ragraph", "index", str(DATASET), "--index-dir", str(root), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": cluster["dashboard"]},
    )
    took = time.monotonic() - t0
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout, job.stdout[-2000:]
    report = next(json.loads(line) for line in reversed(job.stdout.splitlines()) if line.startswith("{"))
    roles = node_ids()
    by_role = {roles.get(n, n): chunks for n, chunks in report["embed_nodes"].items()}
    assert report["published"] and report["engine"] == "ray", report
    assert set(by_role) == {"head", "worker"} and min(by_role.values()) > 0, by_role
    assert sum(by_role.values()) == report["embedded"], (by_role, report["embedded"])

    deadline, answer = time.monotonic() + 30, None
    while time.monotonic() < deadline:  # each retriever replica polls `current` every 0.5 s
        answers = [search(url, question) for _ in range(4)]  # 4 calls: both retriever replicas answer
        if all(a["metadata"]["index_version"] == report["version"] for a in answers):
            answer = answers[-1]
            break
        time.sleep(0.5)
    live = time.monotonic() - t0
    assert answer is not None, f"the serving app still answers from {before}, not {report['version']}"
    assert answer["results"][0]["domain"] == DATASET.name, answer["results"][0]  # the new corpus answers
    RESULTS["reindex_job"] = {"chunks": report["chunks"], "embedded_by_node": by_role, "job_s": round(took, 1),
                              "live_after_submit_s": round(live, 1), "previous": before, "version": report["version"]}
    print(f"\nre-index job: {json.dumps(RESULTS['reindex_job'])}")


def redeploy(cluster, attempt_timeout_s: float | None):
    """A worker node (a new one if the last was lost), and the graph with this retry policy, its
    replicated stages spread over both nodes again: a fresh deployment when the policy changed or
    the replicas sit on the head (a rolling update leaves them where the head had room)."""
    from ray import serve

    from common.config import AppConfig
    from serve.launch import deploy

    c = cluster["cluster"]
    if cluster["worker"] is None:
        cluster["worker"] = c.add_node(num_cpus=4, resources={"cpu_pool": 1000}, node_ip_address=LOOPBACK)
        c.wait_for_nodes()
    data = cluster["cfg"].model_dump(mode="json")
    data["http"]["retries"]["attempt_timeout_s"] = attempt_timeout_s
    cfg = AppConfig.model_validate(data)
    spread = lambda: all(placement()[d] == ["head", "worker"] for d in REPLICATED)  # noqa: E731
    if cfg != cluster["cfg"] or not spread():
        serve.delete("ragraph")
        took = deploy(cfg, address=c.address, progress=lambda m: None)
        print(f"redeployed in {took:.0f} s with http.retries.attempt_timeout_s={attempt_timeout_s}")
        cluster["cfg"] = cfg
    deadline = time.monotonic() + 30
    while not spread():
        assert time.monotonic() < deadline, f"replicas not spread over both nodes: {placement()}"
        time.sleep(1)
    return cfg


def node_processes(node) -> list:
    """Every process of a local Ray node: its raylet and everything under it (workers, agents)."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


@pytest.mark.parametrize("how, attempt_timeout_s", [("killed", None), ("frozen", None), ("frozen", 1.0)],
                         ids=["killed", "frozen-no-attempt-timeout", "frozen-attempt-timeout-1s"])
def test_serving_survives_the_worker_node_dying(cluster, how, attempt_timeout_s):
    """Kill the worker node (its raylet and every process on it) under steady load: the ingress,
    router and retriever replicas there are lost, Serve replaces them on the head, and the client
    sees only the failures its retries (the openai client's policy) cannot hide. Run twice, side by
    side: with and without ``http.retries.attempt_timeout_s`` (a call to a replica on the dead node
    hangs until Ray declares the node dead; the attempt timeout retries it on the live replica)."""
    import ray

    redeploy(cluster, attempt_timeout_s)
    c, url = cluster["cluster"], cluster["url"]
    steady = SteadyLoad(url, rate=RATE).start()
    time.sleep(5)
    worker_id = cluster["worker"].node_id
    killed_at = time.monotonic()
    if how == "killed":  # every process gone at once: their sockets close, callers see errors
        c.remove_node(cluster["worker"], allow_graceful=False)
    else:  # SIGSTOP: a node that stops answering with its connections open (power, kernel, network)
        frozen = node_processes(cluster["worker"])
        for p in frozen:
            p.suspend()
    worker = cluster["worker"]
    cluster["worker"] = None
    dead_seen = recovered = None
    while time.monotonic() - killed_at < 180:
        if dead_seen is None and any(n["NodeID"] == worker_id and not n["Alive"] for n in ray.nodes()):
            dead_seen = time.monotonic() - killed_at  # when the GCS declared the node dead
        states = {d: deployment_state(d) for d in REPLICATED}
        where = placement()
        if all(s == "HEALTHY" and r.get("RUNNING", 0) == 2 for s, r in states.values()) \
                and all(where[d] == ["head", "head"] for d in REPLICATED):
            recovered = time.monotonic() - killed_at
            break
        time.sleep(1)  # resolution 1 s: polling faster steals the 2 cores from the service
    time.sleep(10)
    records = steady.stop()
    if how == "frozen":
        for p in frozen:
            with contextlib.suppress(Exception):
                p.kill()
        c.remove_node(worker, allow_graceful=False)
    s = SteadyLoad.summary(records, since=killed_at - 5, mark=killed_at)
    lat = sorted(r.end - r.start for r in records if r.start >= killed_at - 5 and not r.failed)
    s.update(attempt_timeout_s=attempt_timeout_s,
             latency_p95_s=round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
             slower_than_2s={k: sum(r.end - r.start > 2 for r in records if r.start >= killed_at - 5 and r.kind == k)
                             for k in ("search", "chat")},
             node_marked_dead_s=round(dead_seen, 1) if dead_seen is not None else None,
             serve_recovery_s=round(recovered, 1) if recovered is not None else None,
             not_clean=[{"t": round(r.start - killed_at, 1), "kind": r.kind, "status": r.status, "attempts": r.attempts,
                         "latency_s": round(r.end - r.start, 1), "degraded": r.degraded, "error": r.error}
                        for r in records if r.start >= killed_at - 5 and not r.clean])
    s["how"] = how
    RESULTS[f"worker node {how} ({'attempt timeout ' + str(attempt_timeout_s) + ' s' if attempt_timeout_s else 'no attempt timeout'})"] = s
    print(f"\nworker node {how}: {json.dumps({k: v for k, v in s.items() if k != 'not_clean'})}")
    assert recovered is not None, f"Serve did not move the replicas to the head within 180 s: {placement()}"
    assert s["sent"] >= 40
    lost = {e: n for e, n in s["errors"].items() if "at capacity" not in (e or "")}
    assert not lost, lost  # a failure other than backpressure (503 + Retry-After) is a request the node took with it
    assert s["failed"] <= 0.05 * s["sent"], s["errors"]  # backpressure while the head absorbs the load; reported
    after = [r for r in records if r.start > killed_at + recovered]
    assert after and not any(r.failed for r in after), SteadyLoad.summary(after)
