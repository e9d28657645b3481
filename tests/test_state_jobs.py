"""Ingest jobs (state/jobs.py) over the state database, each test on a SQLite file and on a real
PostgreSQL server (``state_db``): a job's files written and fsync'd before its row, idempotent
submits (on one replica and across two), one job running at a time across several replicas (each
its own Database on the same URL) and each run exactly once, recovery of jobs whose runner died or
went silent, retries up to max_attempts, pruning, the spool sweep, and the API's view of a job."""

import calendar
import inspect
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import event
from state_fixtures import state_db  # noqa: F401  (state_db: a fixture)

import state.jobs as jobs_module
from state.db import Database
from state.jobs import KINDS, STATUSES, JobError, Jobs, SqlJobs

PUBLIC_KEYS = {"id", "object", "kind", "status", "created_at", "started_at", "finished_at", "attempts", "inputs",
               "progress", "failures", "result", "error", "seq"}


@pytest.fixture
def spool(tmp_path):
    return tmp_path / "spool"


@pytest.fixture
def store(state_db, spool):  # noqa: F811
    return SqlJobs(state_db, spool)


def replica(db: Database, spool, opened: list) -> SqlJobs:
    """Another replica: a Database of its own on the same URL, the same spool."""
    other = Database(db.url)
    opened.append(other)
    return SqlJobs(other, spool)


@pytest.fixture
def opened():
    dbs: list[Database] = []
    yield dbs
    for db in dbs:
        db.close()


def set_row(db: Database, job_id: str, **cols) -> None:
    sets = ", ".join(f"{k} = :{k}" for k in cols)
    assert db.execute(f"UPDATE jobs SET {sets} WHERE id = :id", {**cols, "id": job_id}) == 1


def spooled(spool) -> list[str]:
    return sorted(p.name for p in spool.iterdir())


# ---------------------------------------------------------------- the port


def test_sql_jobs_has_the_ports_signatures():
    methods = [n for n, v in vars(Jobs).items() if callable(v) and not n.startswith("_")]
    assert sorted(methods) == sorted(["add", "inputs", "claim", "heartbeat", "finish", "recover", "retry", "sweep",
                                      "get", "list", "pending_document_ids"])
    for name in methods:
        assert inspect.signature(getattr(SqlJobs, name)) == inspect.signature(getattr(Jobs, name)), name
    assert STATUSES == ("queued", "running", "succeeded", "failed") and KINDS == ("upsert", "delete")


# ---------------------------------------------------------------- writing a job


def test_a_jobs_files_are_written_and_fsyncd_before_its_row(store, state_db, spool, monkeypatch):  # noqa: F811
    events = []
    real_write, real_fsync = jobs_module._write_synced, jobs_module.fsync_dir
    monkeypatch.setattr(jobs_module, "_write_synced", lambda p, d: (events.append(("write", p.name)), real_write(p, d)))
    monkeypatch.setattr(jobs_module, "fsync_dir", lambda p: (events.append(("fsync_dir", p.name)), real_fsync(p)))

    @event.listens_for(state_db.engine, "before_cursor_execute")
    def insert(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO jobs"):
            folder = spool / "job_w"
            events.append(("insert", sorted(p.name for p in folder.iterdir())))

    docs = [{"id": "d1", "title": "T", "text": "Body.", "metadata": {"a": 1}}]
    files = [("a.md", b"# A\n\nAlpha."), ("b.pdf", b"%PDF-1.4 bytes")]
    job = store.add("job_w", "upsert", documents=docs, files=files, domain="wine", key_id="k1")
    event.remove(state_db.engine, "before_cursor_execute", insert)
    assert events == [("write", "00000"), ("write", "00001"), ("write", "documents.jsonl"),
                      ("fsync_dir", events[3][1]), ("fsync_dir", "spool"),
                      ("insert", ["00000", "00001", "documents.jsonl"])]
    assert events[3][1].startswith(".tmp-job_w.")  # written aside, then moved into place whole
    assert job["status"] == "queued" and job["progress"] == {"stage": "queued"}
    assert job["inputs"] == {"documents": 1, "files": ["a.md", "b.pdf"], "deletes": [], "domain": "wine"}
    assert spool.stat().st_mode & 0o777 == 0o700 and (spool / "job_w").stat().st_mode & 0o777 == 0o700
    assert spooled(spool) == ["job_w"]
    assert store.inputs("job_w") == (docs, files)
    # what another replica (its own Database on the same URL) reads
    other = SqlJobs(Database(state_db.url), spool)
    try:
        assert other.get("job_w") == job and other.inputs("job_w") == (docs, files)
    finally:
        other.db.close()


def test_bad_kinds_and_job_ids_are_refused(store, spool):
    with pytest.raises(JobError, match="kind must be one of"):
        store.add("job_k", "rename")
    for bad in ("", "../escape", "a/b", ".hidden", "x" * 129, "job.1"):
        with pytest.raises(JobError, match="a job id is"):
            store.add(bad, "delete", deletes=["d"])
    assert store.list() == [] and spooled(spool) == []


def test_a_submit_sent_again_while_the_first_is_written_makes_one_job(store, spool, monkeypatch):
    """A retried submit on the same replica waits for the try still writing, then finds its job."""
    real, started, release = jobs_module._write_synced, threading.Event(), threading.Event()

    def slow(path, data):  # the first try stalls while writing its files
        if not started.is_set():
            started.set()
            release.wait(10)
        real(path, data)

    monkeypatch.setattr(jobs_module, "_write_synced", slow)
    files = [("a.md", b"# A\n\nAlpha."), ("b.md", b"# B\n\nBeta.")]
    first = threading.Thread(target=store.add, args=("job_r", "upsert"), kwargs={"files": files})
    first.start()
    assert started.wait(10)
    again: list[dict] = []
    second = threading.Thread(target=lambda: again.append(store.add("job_r", "upsert", files=files)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits for the first try rather than writing over it
    other = store.add("job_other", "delete", deletes=["x"])  # another job id does not wait
    assert other["status"] == "queued"
    release.set()
    first.join(10)
    second.join(10)
    assert again[0]["id"] == "job_r" and [j["id"] for j in store.list()] == ["job_r", "job_other"]  # its row came last
    assert store.inputs("job_r")[1] == files
    assert spooled(spool) == ["job_other", "job_r"]
    assert store._adding == {}


def test_the_same_id_sent_to_two_replicas_at_once_makes_one_job_from_one_try(state_db, spool, opened,  # noqa: F811
                                                                              monkeypatch):
    """Two replicas (no lock in common) write the same job id at once: one row, the winner's files,
    the loser's removed; neither writes over the other."""
    a, b = SqlJobs(state_db, spool), replica(state_db, spool, opened)
    real_fsync, stalled, release = jobs_module.fsync_dir, threading.Event(), threading.Event()
    first_thread: list[threading.Thread] = []

    def stall(path):  # a's try: its folder is in place, its row not yet written
        real_fsync(path)
        if path == spool and threading.current_thread() is first_thread[0] and not stalled.is_set():
            stalled.set()
            release.wait(10)

    monkeypatch.setattr(jobs_module, "fsync_dir", stall)
    got: list[dict] = []
    t = threading.Thread(target=lambda: got.append(a.add("job_2", "upsert", files=[("a.md", b"from a")])))
    first_thread.append(t)
    t.start()
    assert stalled.wait(10) and spooled(spool) == ["job_2"]
    job = b.add("job_2", "upsert", files=[("a.md", b"from b")])  # job_2 is taken: b writes beside it
    release.set()
    t.join(10)
    assert got[0] == job == b.get("job_2") and len(b.list()) == 1
    assert b.inputs("job_2")[1] == a.inputs("job_2")[1] == [("a.md", b"from b")]
    (name,) = spooled(spool)  # a's folder, not named by the row, is gone
    assert name.startswith("job_2.")
    claimed = a.claim("r")
    assert a.finish(claimed["id"], "r", status="succeeded", result={})
    assert spooled(spool) == []


def test_a_replica_that_finds_the_job_written_while_it_wrote_drops_its_files(state_db, spool, opened,  # noqa: F811
                                                                             monkeypatch):
    a, b = SqlJobs(state_db, spool), replica(state_db, spool, opened)
    real, started, release = jobs_module._write_synced, threading.Event(), threading.Event()

    def slow(path, data):
        if not started.is_set():
            started.set()
            release.wait(10)
        real(path, data)

    monkeypatch.setattr(jobs_module, "_write_synced", slow)
    got: list[dict] = []
    t = threading.Thread(target=lambda: got.append(a.add("job_3", "upsert", files=[("a.md", b"from a")])))
    t.start()
    assert started.wait(10)
    job = b.add("job_3", "upsert", files=[("a.md", b"from b")])
    release.set()
    t.join(10)
    assert got[0] == job and a.inputs("job_3")[1] == [("a.md", b"from b")]
    assert spooled(spool) == ["job_3"]


def test_a_folder_left_by_a_crash_is_not_used_and_is_swept(store, spool):
    """A crash between the files and the row leaves a folder: a later submit of that id writes its
    own (beside it), and the sweep removes what no live job names, once it is old enough."""
    (spool / "job_c").mkdir()
    (spool / "job_c" / "00000").write_bytes(b"stale")
    (spool / ".tmp-job_d.0123").mkdir()
    (spool / "job_young").mkdir()
    old = time.time() - 120
    for p in ("job_c", ".tmp-job_d.0123"):
        os.utime(spool / p, (old, old))
    job = store.add("job_c", "upsert", files=[("a.md", b"fresh")])
    assert store.inputs("job_c")[1] == [("a.md", b"fresh")]
    (ours,) = [n for n in spooled(spool) if n.startswith("job_c.")]
    os.utime(spool / ours, (old, old))  # old, but a live job's: kept
    store.sweep()
    assert spooled(spool) == [ours, "job_young"]
    store.sweep(min_age_s=0)
    assert spooled(spool) == [ours]
    assert store.claim("r")["id"] == job["id"] and store.finish("job_c", "r", status="succeeded", result={})
    assert spooled(spool) == []


def test_an_ended_jobs_files_are_swept_if_left(store, spool):
    store.add("job_e", "upsert", documents=[{"id": "d", "title": "", "text": "x", "metadata": {}}])
    store.claim("r")
    store.finish("job_e", "r", status="failed", error="boom")
    (spool / "job_e").mkdir()  # as if its removal had failed
    store.sweep(min_age_s=0)
    assert spooled(spool) == []


# ---------------------------------------------------------------- claiming, finishing, reading


def test_one_job_runs_at_a_time(store, spool):
    store.add("j1", "delete", deletes=["a"])
    store.add("j2", "delete", deletes=["b"])
    j1 = store.claim("r1")
    assert j1["id"] == "j1" and j1["status"] == "running" and j1["attempts"] == 1
    assert j1["progress"] == {"stage": "starting"} and j1["started_at"] is not None
    assert store.claim("r2") is None  # j1 runs: j2 waits
    assert store.finish("j1", "r1", status="succeeded", result={})
    assert not store.finish("j1", "r1", status="failed")  # a job ends once
    assert store.claim("r2")["id"] == "j2"
    assert store.add("j2", "delete", deletes=["c"])["inputs"]["deletes"] == ["b"]  # same id: the same job
    assert not store.finish("j2", "r1", status="succeeded")  # not its owner
    assert store.finish("j2", "r2", status="failed", error="it broke", failures=[{"file": "x", "error": "y"}])
    assert store.claim("r2") is None  # nothing queued


def test_heartbeats_come_from_the_owner_of_a_running_job(store, state_db):  # noqa: F811
    store.add("j1", "delete", deletes=["a"])
    store.claim("r1")
    set_row(state_db, "j1", heartbeat_at=1.0)
    store.heartbeat("j1", "someone-else", {"stage": "embedding"})
    assert store.get("j1")["progress"] == {"stage": "starting"}
    store.heartbeat("j1", "r1")
    assert store.get("j1")["progress"] == {"stage": "starting"}
    beat = state_db.execute("SELECT heartbeat_at FROM jobs WHERE id = 'j1'")[0][0]
    assert time.time() - beat < 10
    store.heartbeat("j1", "r1", {"stage": "embedding", "chunks": 3})
    assert store.get("j1")["progress"] == {"stage": "embedding", "chunks": 3}


def test_the_apis_view_of_jobs_listing_and_pending_document_ids(store):
    t0 = time.time()
    store.add("j1", "upsert", documents=[{"id": "doc1", "title": "", "text": "x", "metadata": {}}],
              files=[("manual.pdf", b"%PDF"), ("rows.jsonl", b"{}"), ("t.parquet", b"PAR1")], domain="d", key_id="k")
    store.add("j2", "delete", deletes=["gone"])
    store.add("j3", "upsert", files=[("notes.md", b"# N")])
    job = store.claim("r")
    assert set(job) == PUBLIC_KEYS and job["object"] == "ingest.job" and job["id"] == "j1"
    assert job["inputs"] == {"documents": 1, "files": ["manual.pdf", "rows.jsonl", "t.parquet"], "deletes": [],
                             "domain": "d"}
    assert abs(calendar.timegm(time.strptime(job["created_at"], "%Y-%m-%dT%H:%M:%SZ")) - t0) < 5
    assert job["finished_at"] is None and job["result"] is None and job["failures"] == [] and job["error"] is None
    assert store.pending_document_ids() == {"doc1", "manual.pdf", "notes.md"}
    assert store.finish("j1", "r", status="succeeded", result={"added": ["doc1"]}, progress={"stage": "done", "n": 1})
    done = store.get("j1")
    assert done["status"] == "succeeded" and done["result"] == {"added": ["doc1"]} and done["finished_at"]
    assert done["progress"] == {"stage": "done", "n": 1}
    assert store.pending_document_ids() == {"notes.md"}
    assert [j["id"] for j in store.list()] == ["j3", "j2", "j1"]
    assert [j["id"] for j in store.list(limit=2)] == ["j3", "j2"]
    seqs = [j["seq"] for j in store.list()]
    assert seqs == sorted(seqs, reverse=True)
    assert [j["id"] for j in store.list(before=seqs[1])] == ["j1"]
    assert [j["id"] for j in store.list(status="queued")] == ["j3", "j2"]
    assert [j["id"] for j in store.list(status="queued", before=seqs[0], limit=5)] == ["j2"]
    assert store.get("nope") is None and store.inputs("nope") == ([], [])


def test_ended_jobs_are_pruned_to_the_last_keep(store):
    for i in range(4):
        store.add(f"j{i}", "delete", deletes=[str(i)], keep=2)
        store.claim("r")
        store.finish(f"j{i}", "r", status="succeeded" if i % 2 else "failed", result={})
    store.add("q1", "delete", deletes=["x"], keep=2)
    assert [j["id"] for j in store.list()] == ["q1", "j3"]  # the last 2 rows, and every job not ended
    store.add("q2", "delete", deletes=["y"], keep=1)
    assert [j["id"] for j in store.list()] == ["q2", "q1"]  # queued jobs are never pruned


def test_four_replicas_claim_one_job_at_a_time_and_run_each_once(state_db, spool, opened):  # noqa: F811
    """Every ingress replica runs a job loop: four, each with its own Database on the same URL, claim
    from 10 queued jobs (claim, run, finish, repeat); never two running at once, each run once, oldest first."""
    first = SqlJobs(state_db, spool)
    ids = [f"j{i:02d}" for i in range(10)]
    for jid in ids:
        first.add(jid, "delete", deletes=[jid])
    replicas = [replica(state_db, spool, opened) for _ in range(4)]
    lock, barrier, stop = threading.Lock(), threading.Barrier(4), threading.Event()
    active, most, ran, errors, empty = [0], [0], [], [], [0]

    def loop(n: int, store: SqlJobs) -> None:
        owner = f"replica-{n}"
        try:
            barrier.wait(10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not stop.is_set():
                job = store.claim(owner)
                if job is None:
                    with lock:
                        empty[0] += 1
                        if len(ran) == len(ids):
                            return
                    time.sleep(0.001)
                    continue
                with lock:
                    active[0] += 1
                    most[0] = max(most[0], active[0])
                    ran.append((job["id"], owner))
                running = store.db.execute("SELECT count(*) FROM jobs WHERE status = 'running'")[0][0]
                assert running == 1, running
                time.sleep(0.01)  # the run
                with lock:
                    active[0] -= 1
                assert store.finish(job["id"], owner, status="succeeded", result={"by": owner})
            if not stop.is_set():
                errors.append(f"{owner}: out of time")
        except BaseException as e:
            errors.append(f"{owner}: {type(e).__name__}: {e}")
            stop.set()  # the others stop too (a job it held would block them)

    threads = [threading.Thread(target=loop, args=(n, s)) for n, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert most[0] == 1
    assert [jid for jid, _ in ran] == ids  # each once, oldest first
    assert empty[0] > 0  # the replicas did find a job running while they tried
    jobs = {j["id"]: j for j in first.list(limit=50)}
    assert all(jobs[i]["status"] == "succeeded" and jobs[i]["attempts"] == 1 for i in ids)
    assert {jobs[jid]["result"]["by"] for jid in ids} <= {f"replica-{n}" for n in range(4)}
    assert spooled(spool) == []


# ---------------------------------------------------------------- recovery and retries


def test_recover_requeues_a_job_whose_heartbeat_is_stale_then_fails_it_after_max_attempts(store, state_db, spool):  # noqa: F811
    store.add("job_s", "upsert", files=[("a.md", b"# A")])
    store.claim("runner-elsewhere")
    set_row(state_db, "job_s", owner_host="another-host", owner_pid=1, heartbeat_at=time.time() - 5)
    assert store.recover("me", stale_after_s=30, max_attempts=2) == []  # heard from lately: left running
    assert store.recover("runner-elsewhere", stale_after_s=1, max_attempts=2) == []  # a runner never recovers its own
    set_row(state_db, "job_s", heartbeat_at=time.time() - 60)
    assert store.recover("me", stale_after_s=30, max_attempts=2) == ["job_s"]
    job = store.get("job_s")
    assert job["status"] == "queued" and job["attempts"] == 1 and spooled(spool) == ["job_s"]  # inputs kept
    assert job["progress"]["message"] == ("run 1 was interrupted: its runner sent no heartbeat for over 30 s; "
                                          "queued again (run 2 of at most 2)")
    assert not store.finish("job_s", "runner-elsewhere", status="succeeded")  # the old runner lost it
    again = store.claim("runner-2")
    assert again["id"] == "job_s" and again["attempts"] == 2
    set_row(state_db, "job_s", owner_host="another-host", heartbeat_at=time.time() - 60)
    assert store.recover("me", stale_after_s=30, max_attempts=2) == ["job_s"]
    job = store.get("job_s")
    assert job["status"] == "failed" and job["finished_at"] and job["progress"] == {"stage": "done"}
    assert job["error"].startswith("interrupted 2 times (its runner sent no heartbeat for over 30 s); not run again "
                                   "(documents.max_attempts = 2)")
    assert spooled(spool) == [] and store.recover("me", stale_after_s=30, max_attempts=2) == []
    assert store.claim("me") is None


def test_recover_requeues_a_job_whose_process_died_on_this_host_only(store, state_db):  # noqa: F811
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    store.add("here", "delete", deletes=["a"])
    store.add("there", "delete", deletes=["b"])
    store.claim("dead-here")
    set_row(state_db, "here", owner_pid=proc.pid)
    set_row(state_db, "there", status="running", owner="dead-there", owner_host="another-host", owner_pid=proc.pid,
            heartbeat_at=time.time(), attempts=1)
    # a dead pid means nothing on another host: that job is left while its heartbeats are recent
    assert store.recover("me", stale_after_s=30, max_attempts=3) == ["here"]
    assert store.get("here")["progress"]["message"].startswith(
        "run 1 was interrupted: its runner stopped (the process that ran it ended or restarted)")
    assert store.get("there")["status"] == "running"
    # a job of another owner in this very process is from an earlier service in it: its runner is gone
    set_row(state_db, "there", owner_host=socket.gethostname(), owner_pid=os.getpid())
    assert store.recover("me", stale_after_s=30, max_attempts=1) == ["there"]
    job = store.get("there")
    assert job["status"] == "failed" and "interrupted 1 times" in job["error"] and "max_attempts" in job["error"]


def test_a_job_is_still_there_after_a_restart(state_db, spool, opened):  # noqa: F811
    a = SqlJobs(state_db, spool)
    a.add("job_x", "delete", deletes=["anything"])
    a.claim("dead")
    b = replica(state_db, spool, opened)  # reopened, as after a crash
    assert b.get("job_x")["status"] == "running"
    assert b.recover("new", stale_after_s=30, max_attempts=1) == ["job_x"]
    assert b.recover("new", stale_after_s=30, max_attempts=1) == [] and b.claim("new") is None
    assert [j["id"] for j in b.list()] == ["job_x"]  # never lost: still listed


def test_replicas_recovering_at_once_move_a_job_once(state_db, spool, opened):  # noqa: F811
    first = SqlJobs(state_db, spool)
    first.add("job_m", "delete", deletes=["a"])
    first.claim("gone")
    set_row(state_db, "job_m", owner_host="another-host", heartbeat_at=time.time() - 600)
    replicas = [replica(state_db, spool, opened) for _ in range(4)]
    barrier, got, errors = threading.Barrier(4), [], []

    def run(n: int, store: SqlJobs) -> None:
        try:
            barrier.wait(10)
            got.extend(store.recover(f"replica-{n}", stale_after_s=30, max_attempts=3))
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(n, s)) for n, s in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and got == ["job_m"]
    job = first.get("job_m")
    assert job["status"] == "queued" and job["progress"]["message"].startswith("run 1 was interrupted")


def test_recover_leaves_a_job_whose_runner_beat_meanwhile(store, state_db, monkeypatch):  # noqa: F811
    """Between recover's read and its write the runner sends a heartbeat: the job is left running."""
    store.add("job_b", "delete", deletes=["a"])
    store.claim("alive")
    set_row(state_db, "job_b", owner_host="another-host", heartbeat_at=time.time() - 600)
    real = SqlJobs._again

    def beat_first(self, c, r, *a, **kw):
        other = Database(state_db.url)
        try:
            SqlJobs(other, self.spool).heartbeat("job_b", "alive")
        finally:
            other.close()
        return real(self, c, r, *a, **kw)

    if state_db.dialect == "sqlite":
        pytest.skip("SQLite: recover holds the write lock, a heartbeat cannot come between")
    monkeypatch.setattr(SqlJobs, "_again", beat_first)
    assert store.recover("me", stale_after_s=30, max_attempts=3) == []
    assert store.get("job_b")["status"] == "running"


def test_a_crashed_build_is_run_again_then_failed_with_the_reason(store, spool):
    store.add("job_c", "upsert", documents=[{"id": "kept", "title": "", "text": "Corks.", "metadata": {}}])
    for run in (1, 2):
        job = store.claim("me")
        assert job["id"] == "job_c" and job["attempts"] == run
        assert not store.retry("job_c", "not-me", why="x", max_attempts=2)
        assert store.retry("job_c", "me", why="the build crashed: MemoryError: worker ran out of memory", max_attempts=2)
        if run == 1:
            job = store.get("job_c")
            assert job["status"] == "queued" and spooled(spool) == ["job_c"]  # inputs kept for the next run
            assert "MemoryError: worker ran out of memory" in job["progress"]["message"]
            assert store.inputs("job_c")[0][0]["id"] == "kept"
    job = store.get("job_c")
    assert job["status"] == "failed" and "interrupted 2 times (the build crashed: MemoryError" in job["error"], job
    assert spooled(spool) == [] and store.claim("me") is None
    assert not store.retry("job_c", "me", why="x", max_attempts=2)
