"""How long `ragraph backup` and `ragraph restore` take: the recovery time (RTO) of docs/operations.md.

Builds a state database with ``--usage`` usage rows (and as many request ids), ``--conversations``
conversations of ``--turns`` turns each (every other turn with feedback), ``--keys`` API keys and a
few jobs, plus a small fake-embedded index of ``--documents`` documents; then, ``--repeats`` times,
backs it up into a new folder (:func:`state.backup.backup`) and restores it into a fresh target (a
new SQLite file, or a new empty PostgreSQL database, and a new index folder), and reports the
median of each. SQLite always; PostgreSQL with ``--pg URL`` (a server where the URL's user may
create databases; ``$RAGRAPH_BENCH_PG_URL`` by default) or ``--pg auto`` (a throwaway server started
as the tests start one, tests/servers.py).

    python -m load_tests.bench_backup [--pg auto|URL] [--usage 10000] [--conversations 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from load_tests._common import REPO, print_table, write_json


def _config(base: Path, url: str | None):
    from common.config import load_config

    env = {"RAGRAPH__GOVERNOR__DB": str(base / "governor.sqlite3"), "RAGRAPH__INDEXING__DIR": str(base / "index")}
    if url:
        env["RAGRAPH__STATE__URL"] = url
    return load_config(environ=env)


def _new_pg_database(url: str) -> str:
    from servers import fresh_postgres  # tests/servers.py: the server helpers the tests use

    return fresh_postgres(url, prefix="bench")


def _embed(texts: list[str], dim: int = 64) -> tuple[np.ndarray, str]:
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(dim)
            for t in texts]
    v = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9), "fake"


def populate(cfg, base: Path, *, usage: int, conversations: int, turns: int, keys: int, documents: int) -> dict:
    """The state and index to back up; what it holds."""
    from sqlalchemy import text

    from indexing.store import BuildSettings, build_index
    from state.db import Database, url_of
    from state.jobs import SqlJobs
    from state.keys import SqlKeys

    rng = random.Random(0)
    db = Database(url_of(cfg))
    db.upgrade()
    store = SqlKeys(db)
    ids = [store.create(f"user-{i}", daily_tokens=1_000_000)[1].id for i in range(keys)]
    now = time.time()
    days = max(1, usage // len(ids))
    rows = [{"k": ids[i % len(ids)], "p": time.strftime("%Y-%m-%d", time.gmtime(now - 86400 * (i // len(ids)))),
             "n": rng.randint(1, 500), "pt": rng.randint(100, 50_000), "ct": rng.randint(10, 5_000)}
            for i in range(len(ids) * days)][:usage]
    with db.tx() as c:
        c.execute(text("INSERT INTO usage (key_id, period, requests, prompt_tokens, completion_tokens, prefill_s, "
                       "decode_s, cost) VALUES (:k, :p, :n, :pt, :ct, 0.5, 2.5, 0.01)"), rows)
        c.execute(text("INSERT INTO usage_requests (key_id, request_id, created) VALUES (:k, :r, :t)"),
                  [{"k": ids[i % len(ids)], "r": f"req-{i}", "t": now - i} for i in range(usage)])
    answer = "The tasting room is open from 10 am to 6 pm, Tuesday through Sunday. " * 6
    rag = json.dumps({"status": "ok", "sources": [{"id": f"doc-{j}", "title": "Opening hours", "score": 0.8}
                                                  for j in range(5)]})
    for start in range(0, conversations, 200):  # in batches: a PostgreSQL statement_timeout of 5 s is plenty
        convs, trs, reqs, fbs = [], [], [], []
        for i in range(start, min(conversations, start + 200)):
            cid, owner = f"conv_{i:08x}", ids[i % len(ids)]
            convs.append({"id": cid, "o": owner, "t": f"conversation {i}", "c": now - i, "u": now - i})
            for s in range(1, turns + 1):
                rid = f"chat-{i}-{s}"
                trs.append({"id": cid, "s": s, "r": rid, "q": f"question {s} of {i}?", "a": answer, "rag": rag,
                            "t": now - i})
                reqs.append({"o": owner, "r": rid, "id": cid, "t": now - i})
                if s % 2:
                    fbs.append({"o": owner, "r": rid, "id": cid, "sc": 1 if s % 4 == 1 else -1,
                                "cm": "thanks" if s % 4 == 1 else "wrong", "t": now - i})
        with db.tx() as c:
            c.execute(text("INSERT INTO conversations (id, owner, title, created, updated) "
                           "VALUES (:id, :o, :t, :c, :u)"), convs)
            c.execute(text("INSERT INTO turns (conversation_id, seq, request_id, question, answer, rag, created) "
                           "VALUES (:id, :s, :r, :q, :a, :rag, :t)"), trs)
            c.execute(text("INSERT INTO chat_requests (owner, request_id, conversation_id, created) "
                           "VALUES (:o, :r, :id, :t)"), reqs)
            c.execute(text("INSERT INTO feedback (owner, request_id, conversation_id, score, comment, created, "
                           "updated) VALUES (:o, :r, :id, :sc, :cm, :t, :t)"), fbs)
    jobs = SqlJobs(db, base / "spool")
    for i in range(10):
        jobs.add(f"job-{i}", "delete", deletes=[f"doc-{i}"], key_id=ids[0])
    db.close()

    src = base / "src"
    src.mkdir(parents=True)
    words = "wine cellar oak barrel vintage grape harvest tasting room chardonnay riesling pinot club shop".split()
    for i in range(documents):
        body = " ".join(rng.choice(words) for _ in range(300))
        (src / f"doc-{i:04d}.md").write_text(f"# Document {i}\n\n{body}\n")
    settings = BuildSettings(model="fake", model_checksum="", embedder_dtype="float32", chunk_size=200,
                             chunk_overlap=40, bm25_k1=1.2, bm25_b=0.75, stemmer="english", ann_threshold=100_000,
                             hnsw_m=16)
    report = build_index(src, Path(cfg.indexing.dir), settings, embed=_embed, log=lambda _: None)
    return {"keys": keys, "usage_rows": len(rows), "request_ids": usage, "conversations": conversations,
            "turns": conversations * turns, "feedback": conversations * ((turns + 1) // 2), "jobs": 10,
            "index_documents": documents, "index_chunks": report.chunks}


def run(kind: str, pg_url: str | None, args, work: Path) -> dict:
    from state.backup import backup, restore

    source = work / f"{kind}-source"
    cfg = _config(source, _new_pg_database(pg_url) if kind == "postgresql" else None)
    t = time.perf_counter()
    held = populate(cfg, source, usage=args.usage, conversations=args.conversations, turns=args.turns,
                    keys=args.keys, documents=args.documents)
    print(f"{kind}: populated in {time.perf_counter() - t:.1f} s: {held}", file=sys.stderr)
    backups, restores, size, files = [], [], 0, 0
    for r in range(args.repeats):
        out = work / f"{kind}-backup-{r}"
        t = time.perf_counter()
        rec = backup(cfg, out)
        backups.append(time.perf_counter() - t)
        size, files = rec["bytes"], len(rec["files"])
        target = _config(work / f"{kind}-target-{r}", _new_pg_database(pg_url) if kind == "postgresql" else None)
        t = time.perf_counter()
        restore(target, out)
        restores.append(time.perf_counter() - t)
        print(f"{kind} run {r + 1}: backup {backups[-1]:.3f} s, restore {restores[-1]:.3f} s", file=sys.stderr)
    state_bytes = (out / ("state.sqlite3" if kind == "sqlite" else "state.pgdump")).stat().st_size
    return {"kind": kind, **held, "backup_files": files, "backup_bytes": size, "state_bytes": state_bytes,
            "backup_s": round(statistics.median(backups), 3), "restore_s": round(statistics.median(restores), 3),
            "backup_runs_s": [round(x, 3) for x in backups], "restore_runs_s": [round(x, 3) for x in restores]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pg", default=os.environ.get("RAGRAPH_BENCH_PG_URL"),
                   help="a PostgreSQL URL (postgresql+psycopg://user@host:port/db) whose user may create databases, "
                   "or 'auto' (start a throwaway server); default $RAGRAPH_BENCH_PG_URL, else SQLite only")
    p.add_argument("--usage", type=int, default=10_000, help="usage rows (and as many request ids)")
    p.add_argument("--conversations", type=int, default=1_000)
    p.add_argument("--turns", type=int, default=5, help="turns per conversation")
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--documents", type=int, default=50, help="documents in the index")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "load_tests" / "results" / "backup.json")
    args = p.parse_args(argv)

    server = None
    pg_url = args.pg
    sys.path.insert(0, str(REPO / "tests"))
    if pg_url == "auto":
        from servers import PostgresServer

        server = PostgresServer()
        pg_url = server.url
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="ragraph-bench-backup-") as d:
            for kind in ["sqlite"] + (["postgresql"] if pg_url else []):
                rows.append(run(kind, pg_url, args, Path(d)))
    finally:
        if server is not None:
            server.close()
    print()
    print_table(rows, ["kind", "usage_rows", "conversations", "turns", "index_chunks", "backup_files",
                       "backup_bytes", "backup_s", "restore_s"])
    write_json(args.out, {
        "benchmark": "ragraph backup / restore (state/backup.py), median of --repeats, fresh target each restore",
        "command": "python -m load_tests.bench_backup " + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
