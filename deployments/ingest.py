"""Ingest jobs: documents sent to ``POST /v1/documents`` (or deletions) applied to the index as
durable, queued batch jobs.

* :class:`JobStore`: the jobs in SQLite (WAL, synchronous=FULL, created 0600 like the governor's
  database: :func:`deployments.auth.private_file`), and each job's uploaded files in a spool folder
  (0700) until the job ends. A job is written (files fsync'd, then its row) before the request is
  answered ``202``, so an accepted job is never lost.
* :class:`IngestService`: runs the queued jobs one at a time, oldest first: it claims one (``queued``
  -> ``running``, in one transaction, only while no other job runs), builds the new version
  (:func:`build_job`: read the files, apply the changes to the live version with
  :func:`indexing.store.apply_changes`, which embeds only new or changed chunks and publishes with the
  atomic ``current`` swap), and records the outcome. The build runs in a Ray task (``documents.runner``
  ``ray``: on the cluster, off this process, Ray Data embedding from ``indexing.ray_min_chunks``
  chunks up) or in a thread (``thread``: the in-process app); the runner reports a heartbeat meanwhile.
* Limits: a job's uploaded files are read (:func:`read_files`) in a child process forked from a
  forkserver, its address space capped at ``documents.job_memory_mb`` (a file that needs more fails
  alone); a job has ``documents.job_timeout_s`` of wall clock: the reading child is killed at it, the
  embedding stops at its next progress report, a Ray task that has not answered soon after is
  cancelled. A job over its time fails with that reason (it is not run again) and the next one runs.
* Restarts: at start (and then every poll) a ``running`` job whose runner is gone (another instance
  of the service, its process dead or silent for ``documents.stale_after_s``) is queued again, up to
  ``documents.max_attempts`` runs, then failed with the reason. Running a job again is safe: the
  build is idempotent (the same changes on a version that has them publish nothing) and a version is
  either published whole or not at all.

In the serving graph the service lives in the governor's replica (one, pinned where its database is);
``serve.local`` holds one in its own process. The ingress reaches it through ``governor.ingest``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deployments.auth import _tx, connect_db
from indexing.store import fsync_dir

log = logging.getLogger("ray.serve")

STATUSES = ("queued", "running", "succeeded", "failed")
KINDS = ("upsert", "delete")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    owner_host TEXT,
    owner_pid INTEGER,
    key_id TEXT,
    inputs TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    failures TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""


class JobError(ValueError):
    """A job cannot be accepted (the message says why)."""


class JobLimitError(RuntimeError):
    """A job went over ``documents.job_timeout_s`` (the message says where); it fails, not run again."""


def paths(cfg) -> tuple[Path, Path]:
    """(jobs database, spool folder) for an :class:`common.config.AppConfig`: ``documents.jobs_db`` and
    ``documents.spool_dir``, by default beside ``governor.db``."""
    d = cfg.documents
    base = Path(cfg.governor.db).expanduser().parent
    return (d.jobs_db or base / "jobs.sqlite3"), (d.spool_dir or base / "ingest")


def _now() -> float:
    return time.time()


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobStore:
    """The jobs and their spooled inputs. Safe to use from several threads (one connection, one lock)."""

    def __init__(self, db: Path, spool: Path) -> None:
        self.db, self.spool = Path(db), Path(spool)
        self._lock = threading.RLock()
        self._adding = threading.Lock()  # a retried submit waits for the try still writing, then finds its job
        self._conn = connect_db(self.db, error=JobError)
        self._conn.row_factory = sqlite3.Row
        self._conn.executescript(_SCHEMA)
        if not self.spool.exists():
            self.spool.mkdir(parents=True, mode=0o700)
        os.chmod(self.spool, 0o700)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _tx(self._conn) as conn:
            yield conn

    # -- writing a job ----------------------------------------------------------------------------

    def add(self, job_id: str, kind: str, *, documents: list[dict] | None = None,
            files: list[tuple[str, bytes]] | None = None, deletes: list[str] | None = None,
            domain: str | None = None, key_id: str | None = None, keep: int = 1000) -> dict[str, Any]:
        """Write a job (idempotent on ``job_id``: the same id again, even while the first is being
        written, returns the job as it is)."""
        if kind not in KINDS:
            raise JobError(f"kind must be one of {KINDS}, got {kind!r}")
        with self._adding:
            return self._add(job_id, kind, documents=documents, files=files, deletes=deletes, domain=domain,
                             key_id=key_id, keep=keep)

    def _add(self, job_id: str, kind: str, *, documents: list[dict] | None, files: list[tuple[str, bytes]] | None,
             deletes: list[str] | None, domain: str | None, key_id: str | None, keep: int) -> dict[str, Any]:
        existing = self.get(job_id)
        if existing is not None:
            return existing
        folder = self.spool / job_id
        tmp = self.spool / f".tmp-{job_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        names = []
        for n, (name, data) in enumerate(files or []):
            _write_synced(tmp / f"{n:05d}", data)
            names.append(name)
        if documents:
            _write_synced(tmp / "documents.jsonl", "".join(json.dumps(d) + "\n" for d in documents).encode())
        fsync_dir(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        fsync_dir(self.spool)
        ids = [str(d["id"]) for d in documents or []] + [n for n in names if not n.lower().endswith((".jsonl", ".parquet"))]
        inputs = {"documents": len(documents or []), "files": names, "deletes": list(deletes or []),
                  "document_ids": ids, "domain": domain}
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO jobs (id, kind, status, created_at, key_id, inputs, progress) "
                      "VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                      (job_id, kind, _now(), key_id, json.dumps(inputs), json.dumps({"stage": "queued"})))
            c.execute("DELETE FROM jobs WHERE status IN ('succeeded', 'failed') AND seq NOT IN "
                      "(SELECT seq FROM jobs ORDER BY seq DESC LIMIT ?)", (keep,))
        return self.get(job_id)

    def inputs(self, job_id: str) -> tuple[list[dict], list[tuple[str, bytes]]]:
        """The spooled (documents, files) of a job."""
        row = self._row(job_id)
        folder = self.spool / job_id
        docs = []
        if (folder / "documents.jsonl").is_file():
            docs = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines() if line]
        names = json.loads(row["inputs"])["files"] if row else []
        files = [(name, (folder / f"{n:05d}").read_bytes()) for n, name in enumerate(names)]
        return docs, files

    # -- claiming and finishing -------------------------------------------------------------------

    def claim(self, owner: str) -> dict[str, Any] | None:
        """The oldest queued job, now ``running`` under ``owner``; None when none is queued or one runs."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM jobs WHERE status = 'running' LIMIT 1").fetchone():
                return None
            row = c.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = _now()
            c.execute("UPDATE jobs SET status = 'running', started_at = ?, heartbeat_at = ?, attempts = attempts + 1, "
                      "owner = ?, owner_host = ?, owner_pid = ?, progress = ? WHERE id = ?",
                      (now, now, owner, socket.gethostname(), os.getpid(), json.dumps({"stage": "starting"}), row["id"]))
        return self.get(row["id"])

    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> None:
        with self._tx() as c:
            if progress is None:
                c.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND owner = ? AND status = 'running'",
                          (_now(), job_id, owner))
            else:
                c.execute("UPDATE jobs SET heartbeat_at = ?, progress = ? WHERE id = ? AND owner = ? "
                          "AND status = 'running'", (_now(), json.dumps(progress), job_id, owner))

    def finish(self, job_id: str, owner: str, *, status: str, result: dict | None = None,
               failures: list[dict] | None = None, error: str | None = None, progress: dict | None = None) -> bool:
        """Record the outcome; False when ``owner`` no longer holds the job (it was taken as interrupted)."""
        assert status in ("succeeded", "failed")
        with self._tx() as c:
            n = c.execute("UPDATE jobs SET status = ?, finished_at = ?, result = ?, failures = ?, error = ?, progress = ? "
                          "WHERE id = ? AND owner = ? AND status = 'running'",
                          (status, _now(), json.dumps(result) if result is not None else None, json.dumps(failures or []),
                           error, json.dumps(progress or {"stage": "done"}), job_id, owner)).rowcount
        if n:
            shutil.rmtree(self.spool / job_id, ignore_errors=True)
        return bool(n)

    def recover(self, me: str, *, stale_after_s: float, max_attempts: int) -> list[str]:
        """Running jobs whose runner is gone (not ``me``; its process dead on this host, or no heartbeat
        for ``stale_after_s``): queued again, or failed once ``max_attempts`` runs are spent. Returns
        their ids."""
        host = socket.gethostname()
        out = []
        with self._tx() as c:
            rows = c.execute("SELECT * FROM jobs WHERE status = 'running' AND (owner IS NULL OR owner != ?)", (me,)).fetchall()
            for r in rows:
                dead = r["owner_host"] == host and (r["owner_pid"] == os.getpid() or not _pid_alive(r["owner_pid"]))
                silent = _now() - (r["heartbeat_at"] or 0) > stale_after_s
                if not (dead or silent):
                    continue
                why = ("its runner stopped (the process that ran it ended or restarted)" if dead else
                       f"its runner sent no heartbeat for over {stale_after_s:g} s")
                self._again(c, r, why, max_attempts)
                out.append(r["id"])
        return out

    def retry(self, job_id: str, owner: str, *, why: str, max_attempts: int) -> bool:
        """A run ``owner`` could not finish (its build crashed): queued again, or failed once
        ``max_attempts`` runs are spent, as :meth:`recover` does; False when ``owner`` no longer holds it."""
        with self._tx() as c:
            r = c.execute("SELECT * FROM jobs WHERE id = ? AND owner = ? AND status = 'running'", (job_id, owner)).fetchone()
            if r is not None:
                self._again(c, r, why, max_attempts)
        return r is not None

    def _again(self, c: sqlite3.Connection, r: sqlite3.Row, why: str, max_attempts: int) -> None:
        if r["attempts"] < max_attempts:
            progress = {"stage": "queued", "message": f"run {r['attempts']} was interrupted: {why}; "
                        f"queued again (run {r['attempts'] + 1} of at most {max_attempts})"}
            c.execute("UPDATE jobs SET status = 'queued', owner = NULL, progress = ? WHERE id = ?",
                      (json.dumps(progress), r["id"]))
        else:
            c.execute("UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, progress = ? WHERE id = ?",
                      (_now(), f"interrupted {r['attempts']} times ({why}); not run again "
                       f"(documents.max_attempts = {max_attempts}). A version is published whole or not at "
                       "all: GET /v1/index shows what is live; send the documents again to retry",
                       json.dumps({"stage": "done"}), r["id"]))
            shutil.rmtree(self.spool / r["id"], ignore_errors=True)

    def sweep(self, *, min_age_s: float = 60) -> None:
        """Remove spooled inputs of jobs never written (a crash between the files and the row) or already
        ended; a folder younger than ``min_age_s`` may be a submit under way and is left."""
        with self._lock:
            live = {r["id"] for r in self._conn.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running')")}
        for folder in self.spool.iterdir():
            try:
                young = _now() - folder.stat().st_mtime < min_age_s
            except FileNotFoundError:
                continue
            if folder.name.removeprefix(".tmp-") not in live and not young:
                shutil.rmtree(folder, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------

    def _row(self, job_id: str) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self._row(job_id)
        return _public(row) if row is not None else None

    def list(self, *, limit: int = 20, status: str | None = None, before: int | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM jobs", []
        where = []
        if status:
            where.append("status = ?")
            args.append(status)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_public(r) for r in self._conn.execute(q, args).fetchall()]

    def pending_document_ids(self) -> set[str]:
        """Ids of documents that queued or running upsert jobs add (their one-document files and JSON documents)."""
        with self._lock:
            rows = self._conn.execute("SELECT inputs FROM jobs WHERE kind = 'upsert' AND status IN ('queued', 'running')")
            return {i for r in rows for i in json.loads(r["inputs"]).get("document_ids", [])}


def _public(r: sqlite3.Row) -> dict[str, Any]:
    inputs = json.loads(r["inputs"])
    inputs.pop("document_ids", None)
    return {
        "id": r["id"], "object": "ingest.job", "kind": r["kind"], "status": r["status"],
        "created_at": _iso(r["created_at"]), "started_at": _iso(r["started_at"]), "finished_at": _iso(r["finished_at"]),
        "attempts": r["attempts"], "inputs": inputs, "progress": json.loads(r["progress"]),
        "failures": json.loads(r["failures"]), "result": json.loads(r["result"]) if r["result"] else None,
        "error": r["error"], "seq": r["seq"],
    }


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# reading a job's files in a child process it can kill

# what the reader's children import once, in the forkserver they are forked from
_READER_PRELOAD = ["indexing.formats", "indexing.documents", "bs4", "lxml.etree", "pypdf", "docx", "pyarrow.parquet"]


def _reader_context():
    ctx = multiprocessing.get_context("forkserver")  # a fresh, single-threaded parent: safe to fork
    ctx.set_forkserver_preload(_READER_PRELOAD)  # applies when this process's forkserver starts
    return ctx


def _read_child(conn, files: list[tuple[str, bytes]], domain: str, limits, memory_mb: int, cpu_s: int) -> None:
    """The child: address space capped at ``memory_mb`` (a file that needs more fails alone), CPU time
    at ``cpu_s``; it ends as soon as the job's end of ``conn`` is closed (the job's process is gone:
    a reader never outlives it, and its forkserver, which lives while a child of it does, ends too);
    sends ``("reading", name)`` before each file, then ``("read", name, documents)`` or
    ``("failed", name, reason)``, then ``("done",)``."""
    import resource
    import select

    def orphaned() -> None:
        watch = select.poll()
        watch.register(conn.fileno(), select.POLLERR)  # a pipe's writer gets POLLERR when its reader is gone
        watch.poll()
        os._exit(1)

    threading.Thread(target=orphaned, name="ragraph-read-watch", daemon=True).start()
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    from indexing.documents import SourceError
    from indexing.formats import read_upload

    for name, data in files:
        conn.send(("reading", name))
        try:
            docs = [asdict(doc) for doc in read_upload(name, data, domain=domain, limits=limits)]
        except SourceError as e:
            conn.send(("failed", name, str(e)))
        except MemoryError:
            conn.send(("failed", name, f"{name}: reading it needed more memory than documents.job_memory_mb "
                                       f"({memory_mb} MiB) allows"))
        except Exception as e:  # a parser bug on a hostile file fails that file, never the job
            conn.send(("failed", name, f"{name}: could not be read ({type(e).__name__})"))
        else:
            conn.send(("read", name, docs))
    conn.send(("done",))
    conn.close()


def read_files(files: list[tuple[str, bytes]], *, domain: str, limits, memory_mb: int, deadline: float,
               timeout_s: float, log: Callable[[str], None] = lambda _: None
               ) -> tuple[list[tuple[str, Any]], list[dict[str, str]]]:
    """((file name, document) pairs, failures) of ``files``, read by
    :func:`indexing.formats.read_upload` in a child process with ``memory_mb`` of address space. A
    child that dies on a file fails that file and a new one reads the rest; at ``deadline``
    (``time.monotonic()``) the child is killed and :class:`JobLimitError` raised, naming the file
    it was reading."""
    from indexing.documents import Document

    ctx = _reader_context()
    docs: list[tuple[str, Any]] = []
    failures: list[dict[str, str]] = []
    pending = list(files)
    while pending:
        here, there = ctx.Pipe(duplex=False)
        cpu_s = max(1, int(deadline - time.monotonic()) + 1)
        child = ctx.Process(target=_read_child, args=(there, pending, domain, limits, memory_mb, cpu_s),
                            name="ragraph-read", daemon=True)
        child.start()
        there.close()
        current, heard = None, False
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    where = f" while reading {current}" if current else ""
                    raise JobLimitError(f"took longer than documents.job_timeout_s ({timeout_s:g} s){where}")
                if not here.poll(min(left, 1.0)):
                    continue
                try:
                    msg = here.recv()
                except EOFError:  # the child died (a crash in a parser's native code, or killed)
                    child.join(5)
                    why = f"the process reading it died (exit code {child.exitcode})"
                    if not heard:  # it died before reading anything: the rest would fare no better
                        failures += [{"file": name, "reason": f"{name}: {why}"} for name, _ in pending]
                        pending = []
                    else:
                        name = pending.pop(0)[0]
                        failures.append({"file": name, "reason": f"{name}: {why}"})
                    break
                heard = True
                if msg[0] == "reading":
                    current = msg[1]
                    log(f"reading {current}")
                elif msg[0] == "read":
                    pending.pop(0)
                    docs += [(msg[1], Document(**d)) for d in msg[2]]
                elif msg[0] == "failed":
                    pending.pop(0)
                    failures.append({"file": msg[1], "reason": msg[2]})
                elif msg[0] == "done":
                    pending = []
        finally:
            if child.is_alive():
                child.kill()
            child.join(5)
            here.close()
    return docs, failures


# ---------------------------------------------------------------------------------------------
# the build of one job (plain function: runs in a thread or as a Ray task)

_EMBEDDERS: dict[str, Any] = {}  # per process: a Ray worker that built once keeps its model loaded


def build_job(cfg, *, documents: list[dict], files: list[tuple[str, bytes]], deletes: list[str],
              domain: str | None, log: Callable[[str], None] = lambda _: None,
              timeout_s: float | None = None) -> dict[str, Any]:
    """Read the job's documents and files, apply them (or the deletions) to the live version of
    ``indexing.dir`` and publish. Returns ``{"report", "failures", "error"}``: a file or document that
    cannot be read is a failure of its own; ``error`` is set (and nothing published) when nothing is
    left to apply, the build itself fails or it takes longer than ``timeout_s`` (default
    ``documents.job_timeout_s``): the files are read in a child process killed at that limit
    (:func:`read_files`), and the embedding stops at its next progress report (always before the
    version is published)."""
    from indexing.documents import Document, SourceError, _row_to_doc
    from indexing.formats import Limits
    from indexing.jobs import embed_fn, embedder_from_config, settings_from_config
    from indexing.store import IndexBuildError, apply_changes

    d = cfg.documents
    dom = domain or d.default_domain
    limits = Limits.from_config(d)
    timeout_s = d.job_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    failures: list[dict[str, str]] = []
    upserts: dict[str, Document] = {}
    origin: dict[str, str] = {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())

    def add(doc: Document, where: str) -> None:
        if doc.id in upserts:
            failures.append({"document": doc.id, "file": where,
                             "reason": f"document id {doc.id!r} appears twice in this job (first in {origin[doc.id]})"})
            return
        upserts[doc.id], origin[doc.id] = doc, where

    for raw in documents:
        meta = raw.get("metadata") or {}
        try:
            doc = _row_to_doc({"id": raw["id"], "text": raw["text"], "title": raw.get("title") or "", **meta},
                              where=f"documents[{raw['id']}]", domain=dom, default_time=now)
        except SourceError as e:
            failures.append({"document": str(raw.get("id")), "reason": str(e)})
            continue
        if not meta.get("source"):
            doc = Document(**{**asdict(doc), "source": f"api:{doc.id}"})
        add(doc, "the JSON body")
    def note(line: str) -> None:  # reading and embedding check the deadline at each report, before publishing
        if time.monotonic() > deadline:
            raise JobLimitError(f"took longer than documents.job_timeout_s ({timeout_s:g} s)")
        log(line)

    try:
        if files:
            docs, bad = read_files(files, domain=dom, limits=limits, memory_mb=d.job_memory_mb, deadline=deadline,
                                   timeout_s=timeout_s, log=note)
            failures += bad
            for name, doc in docs:
                add(doc, name)
        if (documents or files) and not upserts:
            return {"report": None, "failures": failures,
                    "error": f"every document failed ({len(failures)}); nothing was published"}
        note(f"read {len(upserts)} documents ({len(failures)} failed)")
        key = cfg.models.location("embedder")
        embedder = _EMBEDDERS.get(key) or _EMBEDDERS.setdefault(key, embedder_from_config(cfg))
        embed_checked = embed_fn(cfg, embedder, log=note)

        def embed(texts: list[str]):
            note(f"embedding {len(texts)} texts")
            return embed_checked(texts)

        report = apply_changes(Path(cfg.indexing.dir), settings_from_config(cfg), upserts=list(upserts.values()),
                               deletes=deletes, embed=embed, keep_versions=cfg.indexing.keep_versions, log=log)
    except JobLimitError as e:
        return {"report": None, "failures": failures, "error": f"{e}; nothing was published"}
    except IndexBuildError as e:
        return {"report": None, "failures": failures, "error": str(e).replace(str(cfg.indexing.dir), "<index>")}
    return {"report": asdict(report), "failures": failures, "error": None}


def _ray_build(cfg, payload: dict[str, Any]) -> dict[str, Any]:
    return build_job(cfg, **payload)


# ---------------------------------------------------------------------------------------------
# the service


class IngestService:
    """Jobs accepted, listed and run one at a time (see the module docstring). ``start()`` recovers
    interrupted jobs and starts the runner thread; ``run_once()`` runs the next queued job in the
    caller's thread (tests). ``on_published(version)`` is called after a job publishes."""

    def __init__(self, cfg, *, runner: str | None = None,
                 on_published: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        db, spool = paths(cfg)
        self.store = JobStore(db, spool)
        self.runner = runner or cfg.documents.runner
        self.on_published = on_published
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the calls the ingress makes (through the governor in the graph)

    def submit(self, job_id: str, kind: str, documents: list[dict] | None = None,
               files: list[tuple[str, bytes]] | None = None, deletes: list[str] | None = None,
               domain: str | None = None, key_id: str | None = None) -> dict[str, Any]:
        job = self.store.add(job_id, kind, documents=documents, files=files, deletes=deletes, domain=domain,
                             key_id=key_id, keep=self.cfg.documents.keep_jobs)
        self._wake.set()
        return job

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self.store.get(job_id)

    def jobs(self, limit: int = 20, status: str | None = None, before: int | None = None) -> list[dict[str, Any]]:
        return self.store.list(limit=limit, status=status, before=before)

    def pending_document_ids(self) -> list[str]:
        return sorted(self.store.pending_document_ids())

    # running

    def start(self) -> None:
        recovered = self.recover()
        self.store.sweep()
        if recovered:
            log.warning(f"ingest: jobs interrupted by a restart, queued again or failed: {recovered}")
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ragraph-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def recover(self) -> list[str]:
        d = self.cfg.documents
        return self.store.recover(self.owner, stale_after_s=d.stale_after_s, max_attempts=d.max_attempts)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.recover()
                while not self._stop.is_set() and self.run_once():
                    pass
            except Exception as e:  # the runner must outlive one bad job or a busy database
                log.exception(f"ingest runner: {type(e).__name__}: {e}")
            self._wake.wait(self.cfg.documents.poll_interval_s)
            self._wake.clear()

    def run_once(self) -> bool:
        """Claim and run the next queued job; False when there was none to run."""
        job = self.store.claim(self.owner)
        if job is None:
            return False
        jid = job["id"]
        try:
            documents, files = self.store.inputs(jid)
        except OSError as e:
            self.store.finish(jid, self.owner, status="failed", error=f"its spooled inputs cannot be read ({e.strerror})")
            return True
        payload = {"documents": documents, "files": files, "deletes": job["inputs"]["deletes"],
                   "domain": job["inputs"].get("domain")}
        progress = {"stage": "building", "documents": len(documents), "files": len(files),
                    "deletes": len(payload["deletes"]), "attempt": job["attempts"]}
        self.store.heartbeat(jid, self.owner, progress)
        try:
            out = self._build(jid, payload, progress)
        except Exception as e:  # the build itself crashed (not a bad file: those are failures): run again or fail
            log.exception(f"ingest job {jid}: the build crashed")
            self.store.retry(jid, self.owner, why=f"the build crashed: {type(e).__name__}: {e}"[:2000],
                             max_attempts=self.cfg.documents.max_attempts)
            return True
        report = out["report"]
        result = None
        if report is not None:
            result = {k: report[k] for k in ("version", "previous", "published", "added", "changed", "removed",
                                             "chunks", "embedded", "reused", "engine")}
            result["version"] = report["version"] or report["previous"]  # nothing changed: the live one
            result["seconds"] = {k: round(v, 3) for k, v in report["seconds"].items()}
        done = {"stage": "done", "documents": len(documents), "files": len(files), "deletes": len(payload["deletes"]),
                "failed": len(out["failures"])}
        status = "failed" if out["error"] else "succeeded"
        self.store.finish(jid, self.owner, status=status, result=result, failures=out["failures"], error=out["error"],
                          progress=done)
        if report is not None and report["published"] and self.on_published is not None:
            try:
                self.on_published(report["version"])
            except Exception as e:
                log.warning(f"ingest: after publishing {report['version']}: {type(e).__name__}: {e}")
        return True

    def _build(self, jid: str, payload: dict[str, Any], progress: dict[str, Any]) -> dict[str, Any]:
        """Run :func:`build_job` where ``runner`` says, sending heartbeats until it returns."""
        use_ray = self.runner == "ray" or (self.runner == "auto" and _ray_running())
        beat = max(1.0, min(10.0, self.cfg.documents.stale_after_s / 4))
        if use_ray:
            import ray

            d = self.cfg.documents
            task = ray.remote(_ray_build).options(num_cpus=d.build_num_cpus, resources=dict(d.build_resources) or None,
                                                  max_retries=0)
            ref = task.remote(self.cfg, {**payload, "timeout_s": d.job_timeout_s})
            progress = {**progress, "runner": "ray"}
            # the task keeps its own deadline; one that does not answer by this one is killed
            cancel_at = time.monotonic() + d.job_timeout_s + _CANCEL_GRACE_S
            while True:
                ready, _ = ray.wait([ref], timeout=max(0.1, min(beat, cancel_at - time.monotonic())))
                if ready:
                    return ray.get(ref)
                if time.monotonic() >= cancel_at:
                    ray.cancel(ref, force=True)
                    return {"report": None, "failures": [],
                            "error": f"took longer than documents.job_timeout_s ({d.job_timeout_s:g} s); its Ray task "
                                     "was cancelled (a version is published whole or not at all: GET /v1/index "
                                     "shows what is live)"}
                self.store.heartbeat(jid, self.owner, progress)
        box: dict[str, Any] = {}
        progress = {**progress, "runner": "thread"}

        def note(line: str) -> None:
            progress["message"] = line.strip()
            self.store.heartbeat(jid, self.owner, dict(progress))

        def work() -> None:
            try:
                box["out"] = build_job(self.cfg, log=note, **payload)
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=work, name=f"ragraph-build-{jid}", daemon=True)
        t.start()
        while t.is_alive():
            t.join(beat)
            self.store.heartbeat(jid, self.owner)
        if "error" in box:
            raise box["error"]
        return box["out"]


_CANCEL_GRACE_S = 30.0  # past documents.job_timeout_s, for a Ray task to report its own timeout


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()
