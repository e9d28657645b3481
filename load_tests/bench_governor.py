"""What admission costs per request, side by side in one run.

In-process (the plain :class:`deployments.governor.Governor`, no Ray): an admission with auth on
(key check + both token buckets + the quota read), a usage record (one fsync'd SQLite transaction)
and a cache lookup. With ``--url`` (a running service): ``GET /v1/models`` (admitted: one call to
the governor replica) against ``GET /health`` (not admitted), p50 of ``--n`` sequential requests.

    python -m load_tests.bench_governor [--url http://127.0.0.1:8000 --api-key rg-...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from load_tests._common import REPO, print_table, write_json


def _p50_us(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def in_process(n: int) -> list[dict]:
    from deployments.governor import Governor
    from common.config import load_config

    cfg = load_config(environ={})
    with tempfile.TemporaryDirectory() as d:
        g = cfg.governor.model_copy(update={
            "db": Path(d) / "gov.sqlite3",
            "auth": cfg.governor.auth.model_copy(update={"enabled": True}),
            "rate_limits": cfg.governor.rate_limits.model_copy(update={
                "exempt_ips": [], "per_ip": type(cfg.governor.rate_limits.per_ip)(chat=1e9, search=1e9, other=1e9)}),
        })
        gov = Governor(g)
        token, key = gov.keys.create("bench", chat_per_min=10**9, search_per_min=10**9, other_per_min=10**9)
        rows = [
            {"operation": "admit /v1/search (key + buckets)", "p50_us": _p50_us(
                lambda: gov.admit(token, "10.0.0.1", "/v1/search"), n)},
            {"operation": "admit /v1/chat/completions (+ quota read)", "p50_us": _p50_us(
                lambda: gov.admit(token, "10.0.0.1", "/v1/chat/completions"), n)},
            {"operation": "record usage (fsync'd transaction)", "p50_us": _p50_us(
                lambda: gov.record(key.id, 100, 20), max(n // 10, 50))},
            {"operation": "cache lookup (miss)", "p50_us": _p50_us(lambda: gov.cache_get("0" * 64), n)},
        ]
    return rows


def over_http(url: str, api_key: str | None, n: int) -> list[dict]:
    def get(path: str):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=30) as r:
            r.read()

    get("/health")
    health = _p50_us(lambda: get("/health"), n) / 1000
    models = _p50_us(lambda: get("/v1/models"), n) / 1000
    return [
        {"operation": "GET /health (not admitted)", "p50_ms": health},
        {"operation": "GET /v1/models (admitted by the governor)", "p50_ms": models},
        {"operation": "admission cost over HTTP", "p50_ms": models - health},
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "governor.json")
    args = p.parse_args()
    rows = in_process(args.n)
    print_table(rows, ["operation", "p50_us"])
    http_rows = []
    if args.url:
        http_rows = over_http(args.url.rstrip("/"), args.api_key, min(args.n, 200))
        print()
        print_table(http_rows, ["operation", "p50_ms"])
    write_json(args.out, {"in_process": rows, "http": http_rows, "url": args.url})


if __name__ == "__main__":
    main()
