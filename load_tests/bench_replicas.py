"""The retrieval path (``POST /v1/search``) with 1 and then 2 retriever replicas: requests/s at the knee.

    python load_tests/bench_replicas.py [--rates 5,10,15,20,30,40] [--slo-p95-ms 250] [--duration 20]

Deploys the default graph once (configs/local.yaml, autoscaling pinned: min = max replicas), runs
an open-loop sweep of search requests (Poisson arrivals, ``ragraph loadtest``'s client), then
redeploys with two retriever replicas (the other deployments are unchanged, so Serve keeps them)
and sweeps again. The knee is the highest rate whose p95 stays within the SLO with at most 1% of
requests failed. Each replica takes ``retriever.deployment.num_cpus`` (0.5: one torch thread).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

from _common import REPO, print_table, write_json

sys.path.insert(0, str(REPO))

from load_tests.report import summarize  # noqa: E402
from load_tests.runner import Limits, knee, open_loop, passes  # noqa: E402
from load_tests.workload import Workload, load_questions  # noqa: E402


async def sweep(url: str, rates: list[float], args: argparse.Namespace) -> tuple[list[dict], set[str]]:
    import httpx

    steps, replicas = [], set()
    w = Workload(load_questions(None), mix={"search": 1.0}, seed=1)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=10),
                                 limits=httpx.Limits(max_connections=512)) as client:
        for _ in range(20):  # warm-up
            await client.post("/v1/search", json={"query": "how do I scale the retriever?"})
        t0 = time.perf_counter()
        for rate in rates:
            res = await open_loop(client, w, rate=rate, limits=Limits(args.duration, 100_000, timeout_s=30), t0=t0)
            s = summarize(res.samples, res.window_s)
            served = Counter(x.replicas.get("retriever") for x in res.samples if x.ok)
            replicas |= set(served)
            steps.append({"rate": rate, "summary": s, "retriever_replicas": dict(served)})
            print(f"  {rate:g} req/s: p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, {s['throughput_rps']} answered/s, "
                  f"errors {s['errors']}")
            if not passes(s, args.slo_p95_ms, 0.01):
                break
    return steps, replicas


def wait_replicas(name: str, n: int, timeout: float = 300) -> None:
    """Serve reports an app healthy before a scaled-up deployment's new replica runs: wait for it."""
    from ray import serve

    t = time.perf_counter()
    while time.perf_counter() - t < timeout:
        d = serve.status().applications["ragraph"].deployments[name]
        if sum(v for k, v in d.replica_states.items() if str(getattr(k, "value", k)) == "RUNNING") >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{name}: {n} replicas not running after {timeout:g} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="10,20,30,40,50,60,70,80,100,120", help="open-loop search rates to sweep (req/s)")
    ap.add_argument("--slo-p95-ms", type=float, default=250)
    ap.add_argument("--duration", type=float, default=20, help="seconds per step")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "replicas.json")
    args = ap.parse_args()
    rates = sorted(float(x) for x in args.rates.split(","))

    import ray
    from ray import serve

    from common.config import load_config
    from serve.launch import deploy

    base = load_config()
    results = {}
    try:
        for n in (1, 2):
            r = base.retriever
            dep = r.deployment.model_copy(update={"min_replicas": n, "max_replicas": n})
            cfg = base.model_copy(update={
                "retriever": r.model_copy(update={"deployment": dep}),
                "http": base.http.model_copy(update={"port": args.port}),
            })
            print(f"deploying with {n} retriever replica(s): ready in {deploy(cfg, progress=lambda m: None):.0f} s")
            wait_replicas("retriever", n)
            steps, seen = asyncio.run(sweep(f"http://127.0.0.1:{args.port}", rates, args))
            results[n] = {"steps": steps, "replicas_seen": sorted(seen),
                          "knee_rps": knee([(s["rate"], s["summary"]) for s in steps], args.slo_p95_ms, 0.01)}
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = []
    for n, res in results.items():
        at = next((s["summary"] for s in res["steps"] if s["rate"] == res["knee_rps"]), {})
        rows.append({"retriever replicas": n, "replicas answering": len(res["replicas_seen"]),
                     "knee req/s": res["knee_rps"], "p50 at knee ms": at.get("p50_ms"),
                     "p95 at knee ms": at.get("p95_ms"), "answered/s at knee": at.get("throughput_rps")})
    k1, k2 = results[1]["knee_rps"], results[2]["knee_rps"]
    ratio = round(k2 / k1, 2) if k1 and k2 else None
    print(f"\nsearch knee (p95 <= {args.slo_p95_ms:g} ms, <= 1% errors), {args.duration:g} s per step; 2 vs 1: x{ratio}")
    print_table(rows, list(rows[0]))
    write_json(args.out, {"args": {k: str(v) for k, v in vars(args).items()}, "ratio_2_vs_1": ratio, "rows": rows,
                          "results": {str(k): v for k, v in results.items()}})


if __name__ == "__main__":
    main()
