"""Cold start and one request's latency by stage, for the serving graph on the configured default.

    python load_tests/bench_serve.py [--requests 10] [--port 8000] [--out load_tests/results/serve.json]

Starts a local Ray and the graph (as `ragraph serve` does), measures the time until /health/ready
answers 200, then sends sequential requests (one at a time: no queueing) and prints the median of
each stage's time from the response metadata, next to the client's end-to-end time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path

from _common import REPO, print_table, write_json

QUESTION = "How do I add GPU replicas for the generator?"
STAGES = ["router", "retriever", "retriever.embed", "retriever.search", "prompt", "generator.first_token", "generator", "total"]


def post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
    return (time.perf_counter() - t) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "serve.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from indexing.jobs import index_source
    from indexing.store import current_name
    from common.config import load_config
    from serve.launch import deploy

    cfg = load_config()
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"port": args.port})})
    if current_name(cfg.indexing.dir) is None:
        index_source(cfg, cfg.indexing.source, cfg.indexing.dir)
    cold = deploy(cfg, progress=print)
    url = f"http://127.0.0.1:{args.port}"
    print(f"cold start: {cold:.1f} s")
    try:
        body = {"model": cfg.generator.served_model_name, "max_tokens": args.max_tokens,
                "messages": [{"role": "user", "content": QUESTION}]}
        post(f"{url}/v1/chat/completions", body)  # warm-up: first-request paths
        chats = [post(f"{url}/v1/chat/completions", body) for _ in range(args.requests)]
        searches = [post(f"{url}/v1/search", {"query": QUESTION, "top_k": 5}) for _ in range(args.requests)]
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = []
    for name, runs in (("chat", chats), ("search", searches)):
        row = {"request": name, "client_ms": statistics.median(ms for ms, _ in runs)}
        for s in STAGES:
            metas = [out["metadata"] if name == "search" else out["rag"]["metadata"] for _, out in runs]
            vals = [m["timings_ms"][s] for m in metas if s in m["timings_ms"]]
            if vals:
                row[s] = statistics.median(vals)
        if name == "chat":
            row["completion_tokens"] = statistics.median(o["usage"]["completion_tokens"] for _, o in runs)
            row["prompt_tokens"] = statistics.median(o["usage"]["prompt_tokens"] for _, o in runs)
        rows.append(row)
    print(f"\nmedians over {args.requests} sequential requests (ms); question: {QUESTION!r}")
    print_table(rows, ["request", "client_ms", *STAGES, "prompt_tokens", "completion_tokens"])
    write_json(args.out, {"cold_start_s": round(cold, 1), "requests": args.requests, "question": QUESTION,
                          "max_tokens": args.max_tokens, "rows": rows})


if __name__ == "__main__":
    main()
