"""Ingest jobs: documents sent to ``POST /v1/documents`` (or deletions) applied to the index as
durable, queued batch jobs.

* The jobs are kept by :class:`state.jobs.SqlJobs` in the state database, each job's uploaded files
  in a spool folder (``documents.spool_dir``, 0700; storage every node reads on a cluster) until
  the job ends. A job is written (files fsync'd, then its row) before the request is answered
  ``202``, so an accepted job is never lost.
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

* Read your writes: a job that published waits, before it reports ``succeeded``, until every live
  retriever replica serves the new version (:mod:`state.serving`), at most
  ``documents.serving_timeout_s``.

Every ingress replica holds an :class:`IngestService` (``serve.local`` one in its process); their
runners share the jobs, and one job runs at a time service-wide, whichever runner claims it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from state.db import Database, open_database
from state.jobs import JobError, Jobs, SqlJobs, spool_dir  # noqa: F401 (JobError: what a refused job raises)
from state.serving import Serving, SqlServing, lagging

log = logging.getLogger("ray.serve")


class JobLimitError(RuntimeError):
    """A job went over ``documents.job_timeout_s`` (the message says where); it fails, not run again."""


# What every reader child imports anyway: loaded once, in the forkserver, not once per job.
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

    def __init__(self, cfg, *, db: Database | None = None, runner: str | None = None,
                 on_published: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        db = db if db is not None else open_database(cfg)
        self.store: Jobs = SqlJobs(db, spool_dir(cfg))
        self.serving: Serving = SqlServing(db)
        self.runner = runner or cfg.documents.runner
        self.on_published = on_published
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # the calls the ingress makes

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
        if report is not None and report["published"]:
            if self.on_published is not None:
                try:
                    self.on_published(report["version"])
                except Exception as e:
                    log.warning(f"ingest: after publishing {report['version']}: {type(e).__name__}: {e}")
            result["serving"] = self._await_serving(jid, report["version"], progress)
        status = "failed" if out["error"] else "succeeded"
        self.store.finish(jid, self.owner, status=status, result=result, failures=out["failures"], error=out["error"],
                          progress=done)
        return True

    def _await_serving(self, jid: str, version: str, progress: dict[str, Any]) -> dict[str, Any]:
        """Wait until every live retriever replica serves ``version`` (read your writes: a search sent
        once the job is ``succeeded`` finds what it added and not what it deleted), at most
        ``documents.serving_timeout_s``; what was seen, for the job's result."""
        d = self.cfg.documents
        stale_s = 3 * self.cfg.retriever.reload_interval_s + 5
        t0 = time.monotonic()
        last_beat = 0.0
        while True:
            try:
                versions = self.serving.versions(stale_s=stale_s)
            except Exception as e:  # the version is published: a database hiccup must not fail the job
                log.warning(f"ingest job {jid}: cannot read which replicas serve {version}: {e}")
                return {"replicas": None, "lagging": None, "waited_s": round(time.monotonic() - t0, 3)}
            behind = lagging(versions, version)
            waited = time.monotonic() - t0
            if not behind or waited >= d.serving_timeout_s:
                if behind:
                    log.warning(f"ingest job {jid}: {len(behind)} retriever replica(s) still not serving {version} "
                                f"after {d.serving_timeout_s:g} s (documents.serving_timeout_s): {behind}")
                return {"replicas": len(versions), "lagging": behind, "waited_s": round(waited, 3)}
            if waited - last_beat >= 1:
                last_beat = waited
                self.store.heartbeat(jid, self.owner, {**progress, "stage": "publishing",
                                                       "message": f"waiting for {len(behind)} of {len(versions)} "
                                                                  f"retriever replicas to serve {version}"})
            time.sleep(0.1)

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
