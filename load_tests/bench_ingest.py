"""Upload to searchable: how long from ``POST /v1/documents`` until the documents are found by
``/v1/search``, for batches of 1, 100 and 1,000 documents, against a running service.

For each size: one JSON upload of that many new documents (each with a unique token), then the job
is polled to ``succeeded`` (``job s``: queue + read + embed + build + publish) and ``/v1/search``
for the last document's token until it is the top hit (``searchable s``: the above plus the
retrievers' reload, ``retriever.reload_interval_s``). The documents stay in the index (ids
``bench-<tag>-NNNNN``): run it against a scratch index (``indexing.dir``), not a production one.

    python -m load_tests.bench_ingest --url http://127.0.0.1:8000 [--key ADMIN_KEY] [--sizes 1,100,1000] [--out FILE]

Prints a table; writes JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import httpx


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=120)


def wait_job(c: httpx.Client, job_id: str, timeout_s: float) -> dict:
    end = time.monotonic() + timeout_s
    while True:
        r = c.get(f"/v1/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        if job["status"] in ("succeeded", "failed"):
            return job
        if time.monotonic() > end:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
        time.sleep(0.1)


def one_size(c: httpx.Client, n: int, *, timeout_s: float) -> dict:
    tag = uuid.uuid4().hex[:8]
    docs = [{"id": f"bench-{tag}-{i:05d}", "title": f"Bench {i}",
             "text": f"Ingest benchmark note zq{tag}x{i} about cask {i}: racked on day {i % 28 + 1}, "
                     f"topped up by team {i % 5}, tasted by panel {i % 7} with notes of plum and cedar."}
            for i in range(n)]
    probe = f"zq{tag}x{n - 1}"
    t0 = time.perf_counter()
    r = c.post("/v1/documents", json={"documents": docs})
    r.raise_for_status()
    accepted = time.perf_counter() - t0
    job = wait_job(c, r.json()["job_id"], timeout_s)
    t_job = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise RuntimeError(f"job failed: {job['error']}")
    end = time.monotonic() + timeout_s
    while True:
        hits = c.post("/v1/search", json={"query": probe, "top_k": 1, "strategy": "lexical"}).json()["results"]
        if hits and hits[0]["document_id"] == docs[-1]["id"]:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"{docs[-1]['id']} not searchable after {timeout_s} s")
        time.sleep(0.1)
    t_search = time.perf_counter() - t0
    res = job["result"]
    row = {"documents": n, "accepted_s": round(accepted, 3), "job_s": round(t_job, 3),
           "searchable_s": round(t_search, 3), "embedded": res["embedded"], "reused": res["reused"],
           "chunks": res["chunks"], "engine": res["engine"], "build_seconds": res.get("seconds", {})}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m load_tests.bench_ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None, help="an admin API key (auth on)")
    p.add_argument("--sizes", default="1,100,1000", help="batch sizes, comma-separated")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one size may take")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = []
    with _client(args.url, args.key) as c:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(one_size(c, n, timeout_s=args.timeout))
            r = rows[-1]
            print(f"{r['documents']:>6} docs  accepted {r['accepted_s']:7.2f} s  job {r['job_s']:8.2f} s  "
                  f"searchable {r['searchable_s']:8.2f} s  embedded {r['embedded']:>6}  reused {r['reused']:>6}  "
                  f"({r['engine']})", flush=True)
    print()
    print("| documents | accepted (s) | job succeeded (s) | searchable (s) | chunks embedded | reused |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['documents']} | {r['accepted_s']:.2f} | {r['job_s']:.2f} | {r['searchable_s']:.2f} | "
              f"{r['embedded']} | {r['reused']} |")
    if args.out:
        args.out.write_text(json.dumps({"url": args.url, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
