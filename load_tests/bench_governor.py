"""What admission costs per request, side by side in one run.

In-process, no Ray:

* the old path, the plain :class:`deployments.governor.Governor` called directly (what the
  governor replica did for every request): key check + both token buckets (+ the quota read for
  a chat); a usage record (one fsync'd SQLite transaction) and a cache lookup for scale;
* the new path, :class:`deployments.admission.Admission` as the ingress runs it (``memory://``
  counters, the key in its cache): the same decisions without the governor; and a key-cache miss
  (the governor's ``verify`` answered in-process, so without the actor hop it would cost in the graph);
* admissions per second one ``Admission`` carries in one process (asyncio, ``--concurrency``
  tasks, ``--keys`` keys from ``--ips`` addresses, every key cached).

With ``--url`` (a running service): ``GET /v1/models`` (admitted) against ``GET /health`` (not
admitted), p50 of ``--n`` sequential requests. Prints tables; writes JSON only with ``--out FILE``.

    python -m load_tests.bench_governor [--n 2000] [--out FILE] [--url http://127.0.0.1:8000 --api-key rg-...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from load_tests._common import print_table, write_json


def _p50_us(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def _p50_us_async(make, n: int) -> float:
    async def go() -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await make()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)

    return asyncio.run(go())


BIG = 10**6  # requests per minute: high enough that nothing in the run is refused


def _governor_cfg(d: str):
    from common.config import load_config

    cfg = load_config(environ={})
    rl = cfg.governor.rate_limits
    rates = type(rl.per_ip)(chat=BIG, search=BIG, other=BIG)
    return cfg.governor.model_copy(update={
        "db": Path(d) / "gov.sqlite3",
        "auth": cfg.governor.auth.model_copy(update={"enabled": True}),
        "rate_limits": rl.model_copy(update={"exempt_ips": [], "per_ip": rates, "per_key": rates}),
    })


def in_process(n: int) -> list[dict]:
    from deployments.admission import Admission
    from deployments.governor import Governor

    with tempfile.TemporaryDirectory() as d:
        g = _governor_cfg(d)
        gov = Governor(g)
        token, key = gov.keys.create("bench", chat_per_min=BIG, search_per_min=BIG, other_per_min=BIG)

        async def verify(t):
            return gov.verify(t)

        adm = Admission(g)
        nocache = Admission(g.model_copy(update={"auth": g.auth.model_copy(update={"key_cache_s": 0})}))
        rows = [
            {"path": "old", "operation": "Governor.admit /v1/search (key + buckets)", "p50_us": _p50_us(
                lambda: gov.admit(token, "10.0.0.1", "/v1/search"), n)},
            {"path": "old", "operation": "Governor.admit /v1/chat/completions (+ quota read)", "p50_us": _p50_us(
                lambda: gov.admit(token, "10.0.0.1", "/v1/chat/completions"), n)},
            {"path": "new", "operation": "Admission.admit /v1/search, key cached", "p50_us": _p50_us_async(
                lambda: adm.admit(token, "10.0.0.2", "/v1/search", verify=verify), n)},
            {"path": "new", "operation": "Admission.admit /v1/chat/completions, key cached", "p50_us": _p50_us_async(
                lambda: adm.admit(token, "10.0.0.2", "/v1/chat/completions", verify=verify), n)},
            {"path": "new", "operation": "Admission.admit /v1/search, key-cache miss (verify in-process)",
             "p50_us": _p50_us_async(lambda: nocache.admit(token, "10.0.0.3", "/v1/search", verify=verify), n)},
            {"path": "", "operation": "record usage (fsync'd transaction)", "p50_us": _p50_us(
                lambda: gov.record(key.id, 100, 20), max(n // 10, 50))},
            {"path": "", "operation": "cache lookup (miss)", "p50_us": _p50_us(lambda: gov.cache_get("0" * 64), n)},
        ]
        assert adm.stats()["verify_calls"] == 1, adm.stats()  # every cached admission above was a hit
    return rows


def throughput(total: int, concurrency: int, n_keys: int, n_ips: int, seconds: float = 0.0) -> dict:
    """Admissions per second one Admission carries: ``concurrency`` tasks on one loop share ``total`` admissions."""
    from deployments.admission import Admission
    from deployments.governor import Governor

    with tempfile.TemporaryDirectory() as d:
        g = _governor_cfg(d)
        gov = Governor(g)
        tokens = [gov.keys.create(f"k{i}", chat_per_min=BIG, search_per_min=BIG, other_per_min=BIG)[0]
                  for i in range(n_keys)]
        adm = Admission(g)
        paths = ("/v1/search", "/v1/chat/completions", "/v1/models")

        async def verify(t):
            return gov.verify(t)

        async def go() -> tuple[float, int]:
            for t in tokens:  # warm the key cache: this measures the steady state
                await adm.admit(t, "10.0.0.1", "/v1/models", verify=verify)
            left = [total]
            refused = [0]

            async def worker(w: int) -> None:
                i = w
                while left[0] > 0:
                    left[0] -= 1
                    v = await adm.admit(tokens[i % n_keys], f"10.0.{i % n_ips // 250}.{i % n_ips % 250}",
                                        paths[i % 3], verify=verify)
                    refused[0] += not v.allowed
                    i += concurrency

            t = time.perf_counter()
            await asyncio.gather(*(worker(w) for w in range(concurrency)))
            return time.perf_counter() - t, refused[0]

        took, refused = asyncio.run(go())
        return {"admissions": total, "concurrency": concurrency, "keys": n_keys, "ips": n_ips, "seconds": took,
                "admissions_per_s": total / took, "refused": refused,
                "verify_calls": adm.stats()["verify_calls"]}


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
    p.add_argument("--n", type=int, default=2000, help="calls per p50 row")
    p.add_argument("--total", type=int, default=50_000, help="admissions in the throughput run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--ips", type=int, default=1000)
    p.add_argument("--url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    rows = in_process(args.n)
    print_table(rows, ["path", "operation", "p50_us"])
    tp = throughput(args.total, args.concurrency, args.keys, args.ips)
    print()
    print_table([tp], ["admissions", "concurrency", "keys", "ips", "seconds", "admissions_per_s", "refused",
                       "verify_calls"])
    http_rows = []
    if args.url:
        http_rows = over_http(args.url.rstrip("/"), args.api_key, min(args.n, 200))
        print()
        print_table(http_rows, ["operation", "p50_ms"])
    if args.out:
        write_json(args.out, {"in_process": rows, "throughput": tp, "http": http_rows, "url": args.url,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k != "api_key"}})


if __name__ == "__main__":
    main()
