"""The fault harness on a real graph: steady load, kill -9 one retriever replica, time its
replacement, then shut down and look for vLLM engine processes left behind.

Router and retriever on 2 replicas, generator 1, no reranker; port 8130. About 3-4 minutes (cold start).
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import CORPUS, write_corpus
from faults.harness import SteadyLoad, kill_orphans, kill_replica, replica_actors, wait_no_orphans, wait_recovered

PORT = 8130
pytestmark = pytest.mark.slow


def test_kill_a_retriever_replica_under_load(tmp_path, local_cfg):
    import ray
    from ray import serve

    from indexing.jobs import index_source
    from serve.config import AppConfig
    from serve.launch import deploy

    t_begin, wall_begin = time.monotonic(), time.time()
    root = tmp_path / "index"
    index_source(local_cfg, write_corpus(tmp_path / "src", CORPUS), root, log=lambda _: None)
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(root)
    data["retriever"]["deployment"].update(min_replicas=2, max_replicas=2)
    data["router"]["deployment"].update(min_replicas=2, max_replicas=2)
    data["reranker"]["enabled"] = False
    data["http"].update(port=PORT, ready_timeout_s=600)
    cfg = AppConfig.model_validate(data)

    kill, recovered, error, after = None, None, None, []
    try:
        took = deploy(cfg, progress=lambda m: print(m, flush=True))
        print(f"cold start {took:.0f} s")
        before = replica_actors("retriever")
        print("retriever replicas:", json.dumps(before))
        print("router replicas:", [a["name"] for a in replica_actors("router")])
        print("generator replicas:", [a["name"] for a in replica_actors("generator")])
        assert len(before) == 2

        load = SteadyLoad(f"http://127.0.0.1:{PORT}", rate=4).start()
        t_load = time.monotonic()
        time.sleep(7)
        kill = kill_replica("retriever")
        print("killed:", kill)
        try:
            recovered = wait_recovered("retriever", kill, replicas=2, timeout=90)
        except TimeoutError as e:
            error = e
        after = replica_actors("retriever")
        time.sleep(max(5.0, 20 - (time.monotonic() - t_load)))  # >= 20 s of load, >= 5 s after recovery
        records = load.stop()
        print(f"recovered in {recovered} s; retriever replicas now:", json.dumps(after))
        print("summary, all:         ", SteadyLoad.summary(records))
        print("summary, before kill: ", SteadyLoad.summary(records, until=kill["killed_at"]))
        print("summary, after kill:  ", SteadyLoad.summary(records, since=kill["killed_at"], mark=kill["killed_at"]))
        served: dict = {}
        for r in records:
            if r.start >= kill["killed_at"] and r.replicas.get("retriever"):
                served[r.replicas["retriever"]] = served.get(r.replicas["retriever"], 0) + 1
        print("retriever replicas serving after the kill:", served)
        for r in records:
            if r.failed or r.attempts > 1 or r.rag_status != "ok":
                print(f"  {r.kind:6} t={r.start - kill['killed_at']:+6.2f}s took={r.end - r.start:5.2f}s "
                      f"attempts={r.attempts} status={r.status} rag={r.rag_status} {r.degraded} {r.error}")
        assert SteadyLoad.summary(records)["ok"] > 0
    finally:
        serve.shutdown()
        ray.shutdown()
        orphans = wait_no_orphans(since=wall_begin, timeout=20)
        if orphans:
            print("vLLM ORPHANS after shutdown:", json.dumps(orphans, indent=1))
            print("killed:", kill_orphans(since=wall_begin))
        print(f"whole run {time.monotonic() - t_begin:.0f} s")

    assert error is None, error
    assert kill["actor_id"] not in {a["actor_id"] for a in after} and len(after) == 2, (kill, after)
    assert recovered < 60, recovered
    assert not orphans, f"vLLM engine processes outlived serve.shutdown() + ray.shutdown(): {orphans}"
