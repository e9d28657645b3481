"""The Serve graph against the same pipeline in one process: what the graph costs, what it carries.

    python load_tests/bench_graph.py [--requests 20] [--max-tokens 16] [--users 8] [--duration 45]
        [--sides graph,in-process[,graph-fast]] [--out FILE]

Every side serves the same config (configs/local.yaml), the same index and the same HTTP routes
(``serve/routes.py``), and is measured by the same client (``ragraph loadtest``'s), every request
with ``Cache-Control: no-cache`` so that the pipeline is measured, not the response cache:

* graph: ``ragraph serve`` (Serve proxy -> ingress -> router / retriever / generator replicas);
* graph: as configured (``http.throughput_optimized``, on by default: Ray 2.60's
  ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, direct ingress without the proxy, gRPC between deployments);
* graph-fast / graph-proxy: the same with that variable forced to 1 / 0 in every Ray process;
* in-process: ``python -m serve.local`` (uvicorn -> the plain classes -> vLLM ``AsyncLLM``).

Ray runs every replica (and the vLLM processes it starts) at nice 15, so the client, at normal
priority, would take the CPU from the graph first but not from an in-process server at nice 0
(measured: +13 ms per search from that alone); the in-process server therefore runs at nice 15 too.
Each side runs in its own subprocess, one after the other, so that no Ray or engine state leaks
from one into the next. ``--out`` gets a JSON with ``rows`` (``request``, ``side``, ``p50_ms``,
``sat_rps``, ...) and every side's full summaries.

Low load: ``--requests`` sequential requests (one in flight), p50 end to end, for chat (greedy,
``--max-tokens``) and for search. Saturation: ``--users`` closed-loop users with no think time for
``--duration`` s: answered requests/s and output tokens/s. One side runs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, print_table, write_json

sys.path.insert(0, str(REPO))

from load_tests.runner import Limits, closed_loop  # noqa: E402
from load_tests.report import summarize  # noqa: E402
from load_tests.workload import Workload, load_questions  # noqa: E402


async def measure(url: str, args: argparse.Namespace) -> dict:
    import httpx

    qs = load_questions(None)
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(None, connect=10),
                                 headers={"Cache-Control": "no-cache"}) as client:
        t0 = time.perf_counter()
        for kind in ("chat", "search"):
            w = Workload(qs, mix={kind: 1.0}, max_tokens=(args.max_tokens, args.max_tokens))
            await closed_loop(client, w, users=1, think_s=0, limits=Limits(60, 3), t0=t0)  # warm-up
            low = await closed_loop(client, w, users=1, think_s=0, limits=Limits(600, args.requests), t0=t0)
            sat = await closed_loop(client, Workload(qs, mix={kind: 1.0}, max_tokens=(args.max_tokens, args.max_tokens)),
                                    users=args.users, think_s=0, limits=Limits(args.duration, 100_000), t0=t0)
            lo, hi = summarize(low.samples, low.window_s), summarize(sat.samples, sat.window_s)
            out[kind] = {"low": lo, "saturation": hi}
            print(f"  {kind}: low-load p50 {lo['p50_ms']} ms ({lo['ok']}/{lo['requests']} ok); "
                  f"saturation {hi['throughput_rps']} req/s, {hi['output_tokens_per_s']} tok/s, errors {hi['errors']}")
    return out


def wait_ready(url: str, timeout: float = 600) -> float:
    from serve.launch import ready_status

    t = time.perf_counter()
    while ready_status(url)[0] != 200:
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"{url} not ready after {timeout:g} s")
        time.sleep(1)
    return time.perf_counter() - t


def run_graph(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from common.config import load_config
    from serve.launch import deploy

    cfg = load_config()
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": args.graph_port})})
    cold = deploy(cfg, progress=lambda m: None)
    print(f"graph ready in {cold:.0f} s")
    try:
        return asyncio.run(measure(f"http://127.0.0.1:{args.graph_port}", args))
    finally:
        serve.shutdown()
        ray.shutdown()


def run_local(args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{args.local_port}"
    # at the niceness Ray gives every worker of the graph (15): both sides yield alike to the client
    proc = subprocess.Popen(["nice", "-n", str(RAY_WORKER_NICENESS), sys.executable, "-m", "serve.local",
                             "--port", str(args.local_port)], cwd=REPO, start_new_session=True)
    try:
        print(f"in-process ready in {wait_ready(url):.0f} s")
        return asyncio.run(measure(url, args))
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # uvicorn's shutdown stops the engine and its processes
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


RAY_WORKER_NICENESS = 15  # Ray's default worker_niceness: replicas and the vLLM processes they start
SIDE_ENV = {"graph-fast": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, "graph-proxy": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}}
SIDES = {"graph": run_graph, "graph-fast": run_graph, "graph-proxy": run_graph, "in-process": run_local}


def run_side(side: str, args: argparse.Namespace) -> dict:
    """One side in a fresh subprocess of this script (``--only SIDE``)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = [sys.executable, __file__, "--only", side, "--only-out", f.name]
        for k in ("requests", "max_tokens", "users", "duration", "graph_port", "local_port"):
            argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
        env = {**os.environ, **SIDE_ENV.get(side, {})}
        print(f"== {side}", flush=True)
        subprocess.run(argv, cwd=REPO, env=env, check=True)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=20, help="sequential requests at low load, per kind")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--users", type=int, default=8, help="closed-loop users at saturation")
    ap.add_argument("--duration", type=float, default=45, help="seconds at saturation, per kind")
    ap.add_argument("--graph-port", type=int, default=8000)
    ap.add_argument("--local-port", type=int, default=8001)
    ap.add_argument("--sides", default="graph,in-process", help=f"comma-separated, of {', '.join(SIDES)}")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here (default: print only)")
    ap.add_argument("--only", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--only-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        args.only_out.write_text(json.dumps(SIDES[args.only](args)))
        return

    names = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [n for n in names if n not in SIDES]
    if unknown or "in-process" not in names:
        ap.error(f"--sides: unknown {unknown} (choose from {list(SIDES)}); in-process is needed as the baseline")
    sides = {name: run_side(name, args) for name in names}
    rows = []
    for kind in ("chat", "search"):
        p = sides["in-process"][kind]
        for side, data in sides.items():
            r = data[kind]
            rows.append({
                "request": kind, "side": side, "p50_ms": r["low"]["p50_ms"], "p95_ms": r["low"]["p95_ms"],
                "tokens/answer": round(r["low"]["output_tokens"] / max(r["low"]["ok"], 1), 1),
                "sat_rps": r["saturation"]["throughput_rps"], "sat_tok_s": r["saturation"]["output_tokens_per_s"],
                "sat_p50_ms": r["saturation"]["p50_ms"], "sat_errors": sum(r["saturation"]["errors"].values()),
            })
        for side, data in sides.items():
            if side == "in-process":
                continue
            g = data[kind]
            rows.append({"request": kind, "side": f"{side} - in-process",
                         "p50_ms": round(g["low"]["p50_ms"] - p["low"]["p50_ms"], 2),
                         "sat_rps": f"x{g['saturation']['throughput_rps'] / max(p['saturation']['throughput_rps'], 1e-9):.2f}"})
    print(f"\nlow load: {args.requests} sequential requests; saturation: {args.users} users, {args.duration:g} s; "
          "cache bypassed (Cache-Control: no-cache)")
    print_table(rows, ["request", "side", "p50_ms", "p95_ms", "tokens/answer", "sat_rps", "sat_tok_s", "sat_p50_ms", "sat_errors"])
    if args.out:
        write_json(args.out, {"args": vars(args) | {"out": str(args.out)}, "rows": rows, "sides": sides})


if __name__ == "__main__":
    main()
