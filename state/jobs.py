"""Ingest jobs: the port (:class:`Jobs`) and its implementation over the state database
(:class:`SqlJobs`, table ``jobs``), each job's uploaded files in a spool folder until it ends.

* A job is written before the request is answered ``202``: its files (and documents) are written and
  fsync'd in a folder of the spool first, then its row is committed, so an accepted job is never
  lost. ``add`` is idempotent on the job id: the same id again (a retried submit, on this replica or
  another one, even while the first try is still writing) returns the job as it is. Concurrent tries
  never write over each other's files: each writes a folder of its own, moved into place whole (the
  first one as ``<job id>``, a later one beside it), and the row that wins names its folder.
* The runners are several processes on several machines (every ingress replica runs a job loop), one
  job at a time across all of them: :meth:`SqlJobs.claim` takes the oldest queued job only while no
  other job runs, serialized on PostgreSQL by a transaction advisory lock and on SQLite by its write
  lock (``BEGIN IMMEDIATE``). Every change of a job's state checks the row is still as it was read
  (its owner, status, run count, heartbeat), so two replicas never both move the same job.
* A running job whose runner is gone (its process dead, checked on the runner's own host only, or
  no heartbeat for ``stale_after_s``) is queued again by :meth:`SqlJobs.recover`, up to
  ``max_attempts`` runs, then failed with the reason.
* The spool is a path the caller gives (on a cluster a shared filesystem every node reads); nothing
  else about it is assumed to be local. Ended jobs are pruned to the last ``keep``.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, text

from common.files import private_dir
from indexing.store import fsync_dir
from state.db import Database

log = logging.getLogger("ray.serve")

STATUSES = ("queued", "running", "succeeded", "failed")
KINDS = ("upsert", "delete")
CLAIM_LOCK = 727101  # pg_advisory_xact_lock key of claim() (727100 is the migration lock, state.db)
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a spool folder's name: no dots, no slashes


class JobError(ValueError):
    """A job cannot be accepted (the message says why)."""


def spool_dir(cfg) -> Path:
    """Where an :class:`common.config.AppConfig`'s jobs spool their uploaded files: ``documents.spool_dir``,
    by default ``ingest/`` beside ``governor.db``."""
    return Path(cfg.documents.spool_dir or Path(cfg.governor.db).expanduser().parent / "ingest")


class Jobs(Protocol):
    """The ingest jobs and their spooled inputs."""

    def add(self, job_id: str, kind: str, *, documents: builtins.list[dict] | None = None,
            files: builtins.list[tuple[str, bytes]] | None = None, deletes: builtins.list[str] | None = None,
            domain: str | None = None, key_id: str | None = None, keep: int = 1000) -> dict[str, Any]: ...
    def inputs(self, job_id: str) -> tuple[builtins.list[dict], builtins.list[tuple[str, bytes]]]: ...
    def claim(self, owner: str) -> dict[str, Any] | None: ...
    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> None: ...
    def finish(self, job_id: str, owner: str, *, status: str, result: dict | None = None,
               failures: builtins.list[dict] | None = None, error: str | None = None,
               progress: dict | None = None) -> bool: ...
    def recover(self, me: str, *, stale_after_s: float, max_attempts: int) -> builtins.list[str]: ...
    def retry(self, job_id: str, owner: str, *, why: str, max_attempts: int) -> bool: ...
    def sweep(self, *, min_age_s: float = 60) -> None: ...
    def get(self, job_id: str) -> dict[str, Any] | None: ...
    def list(self, *, limit: int = 20, status: str | None = None,
             before: int | None = None) -> builtins.list[dict[str, Any]]: ...
    def pending_document_ids(self) -> set[str]: ...


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


def _folder_name(job_id: str, inputs: Mapping[str, Any]) -> str:
    """The spool folder of a job: named in its inputs (``spool``), else (a row written before
    there was that field) the job's id."""
    return str(inputs.get("spool") or job_id)


class SqlJobs:
    """:class:`Jobs` over the state database. Safe to share between threads; any number of processes
    (on any number of hosts) may each hold one on the same database and spool."""

    def __init__(self, db: Database, spool: Path) -> None:
        self.db, self.spool = db, Path(spool)
        self._adding_lock = threading.Lock()
        self._adding: dict[str, tuple[threading.Lock, int]] = {}  # job id -> (its lock, tries waiting on it)
        private_dir(self.spool)
        try:
            if self.spool.stat().st_mode & 0o077:
                os.chmod(self.spool, 0o700)
        except PermissionError as e:  # a shared folder made by another user: theirs to fix
            log.warning(f"ingest spool {self.spool}: cannot make it 0700: {e}")

    # -- writing a job ----------------------------------------------------------------------------

    def add(self, job_id: str, kind: str, *, documents: builtins.list[dict] | None = None,
            files: builtins.list[tuple[str, bytes]] | None = None, deletes: builtins.list[str] | None = None,
            domain: str | None = None, key_id: str | None = None, keep: int = 1000) -> dict[str, Any]:
        """Write a job (idempotent on ``job_id``: the same id again, even while the first is being
        written, returns the job as it is)."""
        if kind not in KINDS:
            raise JobError(f"kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise JobError(f"a job id is 1 to 128 letters, digits, '_' or '-', got {job_id!r}")
        with self._one_try(job_id):
            return self._add(job_id, kind, documents=documents, files=files, deletes=deletes, domain=domain,
                             key_id=key_id, keep=keep)

    @contextlib.contextmanager
    def _one_try(self, job_id: str) -> Iterator[None]:
        """In this process, one try of a job id at a time: a retry waits for the try still writing,
        then finds its job (tries on other processes are safe too, see :meth:`_add`)."""
        with self._adding_lock:
            lock, waiting = self._adding.get(job_id, (threading.Lock(), 0))
            self._adding[job_id] = (lock, waiting + 1)
        try:
            with lock:
                yield
        finally:
            with self._adding_lock:
                lock, waiting = self._adding[job_id]
                if waiting == 1:
                    del self._adding[job_id]
                else:
                    self._adding[job_id] = (lock, waiting - 1)

    def _add(self, job_id: str, kind: str, *, documents: builtins.list[dict] | None,
             files: builtins.list[tuple[str, bytes]] | None, deletes: builtins.list[str] | None,
             domain: str | None, key_id: str | None, keep: int) -> dict[str, Any]:
        existing = self.get(job_id)
        if existing is not None:
            return existing
        token = uuid.uuid4().hex[:12]
        tmp = self.spool / f".tmp-{job_id}.{token}"
        tmp.mkdir(mode=0o700)
        try:
            names = []
            for n, (name, data) in enumerate(files or []):
                _write_synced(tmp / f"{n:05d}", data)
                names.append(name)
            if documents:
                _write_synced(tmp / "documents.jsonl", "".join(json.dumps(d) + "\n" for d in documents).encode())
            fsync_dir(tmp)
            folder = self._place(tmp, job_id, token)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if folder is None:  # another try of this id was written meanwhile
            return self.get(job_id)
        fsync_dir(self.spool)
        ids = [str(d["id"]) for d in documents or []] + [n for n in names if not n.lower().endswith((".jsonl", ".parquet"))]
        inputs = {"documents": len(documents or []), "files": names, "deletes": list(deletes or []),
                  "document_ids": ids, "domain": domain, "spool": folder}
        # a failed commit leaves the folder to sweep(): the row may have been committed all the same
        with self.db.tx() as c:
            won = c.execute(text("INSERT INTO jobs (id, kind, status, created_at, key_id, inputs, progress) "
                                 "VALUES (:id, :kind, 'queued', :t, :key, :inputs, :progress) "
                                 "ON CONFLICT (id) DO NOTHING"),
                            {"id": job_id, "kind": kind, "t": _now(), "key": key_id, "inputs": json.dumps(inputs),
                             "progress": json.dumps({"stage": "queued"})}).rowcount
            c.execute(text("DELETE FROM jobs WHERE status IN ('succeeded', 'failed') AND seq NOT IN "
                           "(SELECT seq FROM jobs ORDER BY seq DESC LIMIT :keep)"), {"keep": keep})
        job = self.get(job_id)
        if not won:  # another try's row came first: its own folder holds the inputs
            row = self._row(job_id)
            if row is None or _folder_name(job_id, json.loads(row["inputs"])) != folder:
                shutil.rmtree(self.spool / folder, ignore_errors=True)
        return job

    def _place(self, tmp: Path, job_id: str, token: str) -> str | None:
        """Move a try's written folder into place (never over another's): ``<job id>``, else (that
        name taken by another try, or left by a crash) ``<job id>.<token>``; None when the job's row
        exists by then (the folder is removed)."""
        try:
            tmp.rename(self.spool / job_id)
            return job_id
        except OSError as e:
            if not (self.spool / job_id).exists():
                raise
            log.debug(f"ingest spool: {job_id} is taken ({e.strerror}); writing beside it")
        if self._row(job_id) is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        name = f"{job_id}.{token}"
        tmp.rename(self.spool / name)
        return name

    def inputs(self, job_id: str) -> tuple[builtins.list[dict], builtins.list[tuple[str, bytes]]]:
        """The spooled (documents, files) of a job."""
        row = self._row(job_id)
        inputs = json.loads(row["inputs"]) if row else {}
        folder = self.spool / _folder_name(job_id, inputs)
        docs = []
        if (folder / "documents.jsonl").is_file():
            docs = [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines() if line]
        names = inputs.get("files", [])
        files = [(name, (folder / f"{n:05d}").read_bytes()) for n, name in enumerate(names)]
        return docs, files

    # -- claiming and finishing -------------------------------------------------------------------

    def claim(self, owner: str) -> dict[str, Any] | None:
        """The oldest queued job, now ``running`` under ``owner``; None when none is queued or one runs
        (anywhere: claims of every process are serialized)."""
        with self.db.tx() as c:
            if self.db.dialect == "postgresql":
                c.execute(text(f"SELECT pg_advisory_xact_lock({CLAIM_LOCK})"))  # till commit
            if c.execute(text("SELECT 1 FROM jobs WHERE status = 'running' LIMIT 1")).first():
                return None
            jid = c.execute(text("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1")).scalar()
            if jid is None:
                return None
            now = _now()
            n = c.execute(text("UPDATE jobs SET status = 'running', started_at = :t, heartbeat_at = :t, "
                               "attempts = attempts + 1, owner = :owner, owner_host = :host, owner_pid = :pid, "
                               "progress = :progress WHERE id = :id AND status = 'queued'"),
                          {"t": now, "owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "progress": json.dumps({"stage": "starting"}), "id": jid}).rowcount
            if not n:
                return None
        return self.get(jid)

    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> None:
        params = {"t": _now(), "id": job_id, "owner": owner}
        with self.db.tx() as c:
            if progress is None:
                c.execute(text("UPDATE jobs SET heartbeat_at = :t WHERE id = :id AND owner = :owner "
                               "AND status = 'running'"), params)
            else:
                c.execute(text("UPDATE jobs SET heartbeat_at = :t, progress = :progress WHERE id = :id "
                               "AND owner = :owner AND status = 'running'"),
                          {**params, "progress": json.dumps(progress)})

    def finish(self, job_id: str, owner: str, *, status: str, result: dict | None = None,
               failures: builtins.list[dict] | None = None, error: str | None = None,
               progress: dict | None = None) -> bool:
        """Record the outcome; False when ``owner`` no longer holds the job (it was taken as interrupted)."""
        assert status in ("succeeded", "failed")
        with self.db.tx() as c:
            row = c.execute(text("SELECT inputs FROM jobs WHERE id = :id AND owner = :owner AND status = 'running'"),
                            {"id": job_id, "owner": owner}).first()
            n = c.execute(text("UPDATE jobs SET status = :status, finished_at = :t, result = :result, "
                               "failures = :failures, error = :error, progress = :progress "
                               "WHERE id = :id AND owner = :owner AND status = 'running'"),
                          {"status": status, "t": _now(), "result": json.dumps(result) if result is not None else None,
                           "failures": json.dumps(failures or []), "error": error,
                           "progress": json.dumps(progress or {"stage": "done"}), "id": job_id,
                           "owner": owner}).rowcount
        if n:
            self._drop_spool(job_id, row[0] if row is not None else None)
        return bool(n)

    def recover(self, me: str, *, stale_after_s: float, max_attempts: int) -> builtins.list[str]:
        """Running jobs whose runner is gone (not ``me``; its process dead on this host, or no heartbeat
        for ``stale_after_s``): queued again, or failed once ``max_attempts`` runs are spent. Returns
        their ids (a job another replica recovered at the same time is in only one of the lists)."""
        host = socket.gethostname()
        out, spools = [], []
        with self.db.tx() as c:
            rows = c.execute(text("SELECT * FROM jobs WHERE status = 'running' AND (owner IS NULL OR owner != :me)"),
                             {"me": me}).mappings().all()
            for r in rows:
                dead = r["owner_host"] == host and (r["owner_pid"] == os.getpid() or not _pid_alive(r["owner_pid"]))
                silent = _now() - (r["heartbeat_at"] or 0) > stale_after_s
                if not (dead or silent):
                    continue
                why = ("its runner stopped (the process that ran it ended or restarted)" if dead else
                       f"its runner sent no heartbeat for over {stale_after_s:g} s")
                moved = self._again(c, r, why, max_attempts, same_heartbeat=True)
                if moved:
                    out.append(r["id"])
                    if moved == "failed":
                        spools.append((r["id"], r["inputs"]))
        for jid, inputs in spools:
            self._drop_spool(jid, inputs)
        return out

    def retry(self, job_id: str, owner: str, *, why: str, max_attempts: int) -> bool:
        """A run ``owner`` could not finish (its build crashed): queued again, or failed once
        ``max_attempts`` runs are spent, as :meth:`recover` does; False when ``owner`` no longer holds it."""
        with self.db.tx() as c:
            r = c.execute(text("SELECT * FROM jobs WHERE id = :id AND owner = :owner AND status = 'running'"),
                          {"id": job_id, "owner": owner}).mappings().first()
            moved = self._again(c, r, why, max_attempts, same_heartbeat=False) if r is not None else None
        if moved == "failed":
            self._drop_spool(job_id, r["inputs"])
        return moved is not None

    def _again(self, c: Connection, r: Mapping[str, Any], why: str, max_attempts: int, *,
               same_heartbeat: bool) -> str | None:
        """Queue a running job again (or fail it); only if its row is still as read (same owner, run
        and, with ``same_heartbeat``, heartbeat): what it became, or None when someone moved it first."""
        where = ["id = :id", "status = 'running'", "attempts = :attempts"]
        params: dict[str, Any] = {"id": r["id"], "attempts": r["attempts"]}
        for col, check in (("owner", True), ("heartbeat_at", same_heartbeat)):
            if not check:
                continue
            if r[col] is None:
                where.append(f"{col} IS NULL")
            else:
                where.append(f"{col} = :{col}")
                params[col] = r[col]
        cond = " AND ".join(where)
        if r["attempts"] < max_attempts:
            progress = {"stage": "queued", "message": f"run {r['attempts']} was interrupted: {why}; "
                        f"queued again (run {r['attempts'] + 1} of at most {max_attempts})"}
            n = c.execute(text(f"UPDATE jobs SET status = 'queued', owner = NULL, progress = :progress WHERE {cond}"),
                          {**params, "progress": json.dumps(progress)}).rowcount
            return "queued" if n else None
        n = c.execute(text(f"UPDATE jobs SET status = 'failed', finished_at = :t, error = :error, progress = :progress "
                           f"WHERE {cond}"),
                      {**params, "t": _now(), "progress": json.dumps({"stage": "done"}),
                       "error": f"interrupted {r['attempts']} times ({why}); not run again "
                                f"(documents.max_attempts = {max_attempts}). A version is published whole or not at "
                                "all: GET /v1/index shows what is live; send the documents again to retry"}).rowcount
        return "failed" if n else None

    def _drop_spool(self, job_id: str, inputs: str | None) -> None:
        """Remove an ended job's spooled inputs (after its row says so)."""
        name = _folder_name(job_id, json.loads(inputs) if inputs else {})
        shutil.rmtree(self.spool / name, ignore_errors=True)

    def sweep(self, *, min_age_s: float = 60) -> None:
        """Remove spooled inputs of jobs never written (a crash between the files and the row, a try
        that lost to another) or already ended; a folder younger than ``min_age_s`` may be a submit
        under way and is left."""
        with self.db.read() as c:
            rows = c.execute(text("SELECT id, inputs FROM jobs WHERE status IN ('queued', 'running')")).all()
        live = {_folder_name(jid, json.loads(inputs)) for jid, inputs in rows}
        for folder in self.spool.iterdir():
            try:
                young = _now() - folder.stat().st_mtime < min_age_s
            except FileNotFoundError:
                continue
            if folder.name not in live and not young:
                shutil.rmtree(folder, ignore_errors=True)

    # -- reading ----------------------------------------------------------------------------------

    def _row(self, job_id: str) -> Mapping[str, Any] | None:
        with self.db.read() as c:
            return c.execute(text("SELECT * FROM jobs WHERE id = :id"), {"id": job_id}).mappings().first()

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self._row(job_id)
        return _public(row) if row is not None else None

    def list(self, *, limit: int = 20, status: str | None = None,
             before: int | None = None) -> builtins.list[dict[str, Any]]:
        q, params, where = "SELECT * FROM jobs", {"limit": limit}, []
        if status:
            where.append("status = :status")
            params["status"] = status
        if before is not None:
            where.append("seq < :before")
            params["before"] = before
        if where:
            q += " WHERE " + " AND ".join(where)
        q += " ORDER BY seq DESC LIMIT :limit"
        with self.db.read() as c:
            return [_public(r) for r in c.execute(text(q), params).mappings().all()]

    def pending_document_ids(self) -> set[str]:
        """Ids of documents that queued or running upsert jobs add (their one-document files and JSON documents)."""
        with self.db.read() as c:
            rows = c.execute(text("SELECT inputs FROM jobs WHERE kind = 'upsert' AND status IN ('queued', 'running')")).all()
        return {i for (inputs,) in rows for i in json.loads(inputs).get("document_ids", [])}


def _public(r: Mapping[str, Any]) -> dict[str, Any]:
    """A job as the HTTP API shows it (``GET /v1/jobs``)."""
    inputs = json.loads(r["inputs"])
    inputs.pop("document_ids", None)
    inputs.pop("spool", None)
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
