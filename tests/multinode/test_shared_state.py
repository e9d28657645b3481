"""Two ingress replicas on two Ray nodes over one state database and one Redis, and the head's GCS
restarted under load with GCS fault tolerance on.

    pytest tests/multinode/test_shared_state.py -m slow -s

The cluster (``ray.cluster_utils.Cluster``, a head and a worker on this machine) is started with
``RAY_REDIS_ADDRESS`` naming a real ``redis-server``: the GCS keeps its tables there, as
``ragraph kuberay``'s ``gcsFaultToleranceOptions`` and ``cluster.yaml``'s head do. The same Redis
holds the ingress replicas' rate-limit counters and cached answers; both replicas open the one state
file (both nodes are this machine). Auth is on.

- A key allowed N searches a minute gets N across the two replicas, not 2N, and the answers show
  that both replicas served it (``metadata.replicas.ingress``).
- The GCS process killed for 10 s and started again, under a steady load of searches and chats:
  no request fails (after the openai-style retries of the client), searches are answered while the
  GCS is down, no replica restarts, and the Serve controller answers again after.

The chats are extractive: on these two nodes of one 2-core machine the vLLM engine took 4 to 8 s a
chat when idle and timed every chat out under this load, with or without the GCS restart (seen
while writing this test; the single-node fault tests, tests/faults, charge generated chats).

This is the GCS, not the whole head: the proxy runs on the head (two proxies on one machine would
want the same port), so restarting every head process would cut the clients off here; on KubeRay a
restarted head pod is the same recovery with the workers' proxies serving meanwhile.
With ``RAGRAPH_RESULTS_DIR=load_tests/results`` results go to ``shared_state.json`` there.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import indexed_config, keys_at, results_file
from faults.harness import SteadyLoad, deployment_state, gcs_replicas, wait_no_orphans
from multinode.cluster import LOOPBACK, loopback_cluster, write_results

pytestmark = pytest.mark.slow
PORT = 8160
RATE = 2.0  # requests/s, half searches, half chats (extractive: see the module's docstring)
LIMIT = 12  # searches a minute for the limited key
REPORT = results_file("shared_state.json")
RESULTS: dict[str, dict] = {}


def node_roles() -> dict[str, str]:
    import ray

    return {n["NodeID"]: "head" if "ragraph_head" in n["Resources"] else "worker" for n in ray.nodes() if n["Alive"]}


@pytest.fixture(scope="module")
def redis():
    from servers import RedisServer

    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, local_cfg, provisioned, redis):
    from common.config import AppConfig
    from serve.launch import deploy

    started = time.time()
    env = {"RAY_REDIS_ADDRESS": f"{LOOPBACK}:{redis.port}",  # GCS fault tolerance: its tables in Redis
           # the one proxy (on the head) would send every request to the head's ingress replica: here it
           # spreads them over both, as clients reaching the proxies of both nodes would on a cluster
           "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    base = tmp_path_factory.mktemp("shared-state")
    data = indexed_config(local_cfg, base)
    data["http"]["deployment"].update(min_replicas=2, max_replicas=2, num_cpus=0.1, health_check_period_s=2)
    data["generator"]["deployment"].update(health_check_period_s=2, resources={"ragraph_head": 0.01})
    data["http"].update(port=PORT, proxy_location="HeadOnly")
    data["http"]["timeouts"]["generator_first_token"] = 30
    db = base / "state.sqlite3"
    data["governor"]["db"] = str(db)
    data["governor"]["auth"] = {"enabled": True, "key_cache_s": 30}
    data["governor"]["rate_limits"].update(storage=redis.url, exempt_ips=[])
    data["governor"]["cache"].update(enabled=False)
    data["reranker"]["enabled"] = False
    data["generator"]["answer_mode"] = "extractive"
    keys = keys_at(db)
    admin, admin_key = keys.create("load", "admin", chat_per_min=10**5, search_per_min=10**5, other_per_min=10**5)
    limited, _ = keys.create("limited", search_per_min=LIMIT)
    cfg = AppConfig.model_validate(data)
    with loopback_cluster(env=env) as (c, _):
        took = deploy(cfg, address=c.address, progress=lambda m: print(m, flush=True))
        print(f"cold start on 2 nodes {took:.0f} s")
        yield {"cluster": c, "url": f"http://{LOOPBACK}:{PORT}", "db": db, "admin": admin, "admin_id": admin_key.id,
               "limited": limited}
    orphans = wait_no_orphans(since=started)
    write_results(REPORT, RESULTS, RATE)
    assert not orphans, f"vLLM processes outlived the cluster: {orphans}"


def test_two_ingress_replicas_on_two_nodes_share_one_key_limit(cluster):
    roles = node_roles()
    ingress = gcs_replicas()["ingress"]
    assert sorted(roles.get(a["node_id"]) for a in ingress) == ["head", "worker"], ingress
    headers = {"Authorization": f"Bearer {cluster['limited']}"}

    def one(i: int) -> tuple[int, str | None]:
        r = httpx.post(f"{cluster['url']}/v1/search", headers=headers, timeout=60,
                       json={"query": f"Is parking free for visitors? {i}", "top_k": 2})
        return r.status_code, (r.json().get("metadata", {}).get("replicas", {}).get("ingress")
                               if r.status_code == 200 else r.headers.get("retry-after"))

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(3 * LIMIT)))
    statuses = [s for s, _ in got]
    served_by = {who for s, who in got if s == 200}
    RESULTS["shared key limit"] = {"limit_per_min": LIMIT, "sent": len(got), "ok": statuses.count(200),
                                   "refused_429": statuses.count(429), "ingress_replicas_that_answered": len(served_by)}
    print(RESULTS["shared key limit"])
    assert statuses.count(200) == LIMIT and statuses.count(429) == 2 * LIMIT, statuses  # not 2 x LIMIT
    assert len(served_by) == 2, served_by  # both replicas admitted some: the one budget is shared
    assert all(float(ra) > 0 for s, ra in got if s == 429)  # each refusal says when to come back


def test_the_application_keeps_serving_while_the_gcs_restarts(cluster):
    head = cluster["cluster"].head_node
    before = {d: [a["actor_id"] for a in rs] for d, rs in gcs_replicas().items()}
    steady = SteadyLoad(cluster["url"], rate=RATE, headers={"Authorization": f"Bearer {cluster['admin']}"},
                        max_retries=6, retry_after_cap=2, timeout=60).start()
    time.sleep(5)
    killed = time.monotonic()
    head.kill_gcs_server()
    time.sleep(10)
    head.start_gcs_server()
    restarted = time.monotonic()
    time.sleep(15)
    records = steady.stop()

    def controller_answers() -> bool:
        try:
            return deployment_state("ingress")[0] == "HEALTHY"
        except Exception:  # noqa: BLE001 - the driver reconnects to the new GCS in the background
            return False

    deadline = time.monotonic() + 60
    while not controller_answers() and time.monotonic() < deadline:
        time.sleep(1)
    after = {d: [a["actor_id"] for a in rs] for d, rs in gcs_replicas().items()}
    s = SteadyLoad.summary(records)
    down = SteadyLoad.summary(records, since=killed, until=restarted)
    searches_down = [r for r in records if r.kind == "search" and killed <= r.start < restarted]
    answered_down = sum(r.status == 200 and r.end < restarted for r in searches_down)
    s.update(searches_answered_while_gcs_down=answered_down, searches_sent_while_gcs_down=len(searches_down),
             sent_while_gcs_down=down["sent"], controller_healthy_after=controller_answers(),
             replicas_unchanged=after == before)
    RESULTS["gcs restart"] = s
    print(f"\nGCS killed for 10 s under load: {json.dumps(s)}")
    assert s["sent"] >= 30
    assert s["failed"] == 0, s["errors"]
    # answered while the GCS was down, not only queued until it came back
    assert len(searches_down) >= 5 and answered_down >= len(searches_down) - 1, s
    assert s["controller_healthy_after"]
    assert after == before  # no replica restarted: the cluster found its actors again in Redis
    assert s["degraded"] == 0, s  # every answer whole: no stage was lost meanwhile
