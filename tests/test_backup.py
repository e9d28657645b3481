"""`ragraph backup DIR` and `ragraph restore DIR` (state/backup.py), on SQLite and on a real
PostgreSQL: real state written through the stores (a key, usage, a conversation with turns and
feedback, a job) and a real (small, fake-embedded) index; backed up while another thread records
usage; restored into a fresh config, where everything reads back the same. And what a restore
refuses, leaving the target as it was: a damaged backup, a non-empty target without --force, a
schema newer than the code, the other database kind; a backup refuses a non-empty folder."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import inspect

from common.config import load_config
from conftest import CORPUS, write_corpus
from indexing.store import BuildSettings, build_index, current_name, read_manifest, verify_files
from state.backup import BACKUP_JSON, BackupError, backup, restore
from state.conversations import SqlConversations
from state.db import Database, describe, head_revision, url_of
from state.jobs import SqlJobs, spool_dir
from state.keys import SqlKeys
from state.usage import SqlUsage
from state_fixtures import fresh_postgres

NOW = time.time()  # every usage record of a test falls in the same UTC day and month
DIM = 16
SETTINGS = BuildSettings(model="fake", model_checksum="", embedder_dtype="float32", chunk_size=200, chunk_overlap=20,
                         bm25_k1=1.2, bm25_b=0.75, stemmer="english", ann_threshold=100000, hnsw_m=16)
KINDS = ["sqlite", "postgresql"]


def _embed(texts: list[str]) -> tuple[np.ndarray, str]:
    rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
            for t in texts]
    v = np.stack(rows).astype(np.float32) if rows else np.zeros((0, DIM), np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9), "fake"


def _env(base: Path, kind: str, request) -> dict[str, str]:
    """The RAGRAPH__ overrides of a config whose state and index live under ``base`` (PostgreSQL: a
    new empty database)."""
    env = {"RAGRAPH__GOVERNOR__DB": str(base / "governor.sqlite3"), "RAGRAPH__INDEXING__DIR": str(base / "index")}
    if kind == "postgresql":
        env["RAGRAPH__STATE__URL"] = fresh_postgres(request.getfixturevalue("postgres_url"))
    return env


def _config(base: Path, kind: str, request):
    return load_config(environ=_env(base, kind, request))


def _populate(cfg, base: Path, *, revision: str = "head") -> dict:
    """Real state through the stores and a published index; the ids to read them back by."""
    db = Database(url_of(cfg))
    db.upgrade(revision)
    token, key = SqlKeys(db).create("alice", "admin", daily_tokens=100_000, chat_per_min=30)
    usage = SqlUsage(db)
    usage.record(key.id, prompt_tokens=120, completion_tokens=30, cost=0.25, request_id="u-1", now=NOW)
    usage.record(key.id, prompt_tokens=80, completion_tokens=20, prefill_s=0.1, decode_s=0.4, request_id="u-2", now=NOW)
    conv = SqlConversations(db)
    cid = conv.create(key.id, "wine questions")["id"]
    for i in (1, 2, 3):
        conv.chat_done(key.id, f"req-{i}", cid, {"question": f"question {i}", "answer": f"answer {i}",
                                                 "rag": {"sources": [{"id": f"doc-{i}"}], "status": "ok"}})
    conv.put_feedback(key.id, "req-1", 1, "helpful")
    conv.put_feedback(key.id, "req-3", -1, "wrong vintage")
    SqlJobs(db, base / "spool").add("job-1", "delete", deletes=["wine/reds.md"], key_id=key.id)
    SqlJobs(db, spool_dir(cfg)).add(  # an upload still waiting: its files are in the config's spool
        "upload-1", "upsert", key_id=key.id, documents=[{"id": "notes/a", "text": "The cellar opens at ten."}],
        files=[("menu.md", b"# Menu\n\nCheese and bread.\n"), ("hours.txt", bytes(range(256)))])
    db.close()
    build_index(write_corpus(base / "src"), Path(cfg.indexing.dir), SETTINGS, embed=_embed, log=lambda _: None)
    return {"token": token, "key": key.id, "conversation": cid}


def _read_back(cfg, ids: dict, spool: Path) -> dict:
    db = Database(url_of(cfg))
    try:
        conv = SqlConversations(db)
        key = SqlKeys(db).verify(ids["token"])
        return {
            "key": None if key is None else (key.id, key.scope, key.daily_tokens, key.chat_per_min),
            "usage": SqlUsage(db).usage(ids["key"], now=NOW),
            "standing": SqlUsage(db).standing(ids["key"], now=NOW),
            "conversation": conv.get(ids["key"], ids["conversation"]),
            "feedback": conv.feedback(),
            "job": SqlJobs(db, spool).get("job-1"),
            "upload": SqlJobs(db, spool_dir(cfg)).get("upload-1"),
            "upload_inputs": SqlJobs(db, spool_dir(cfg)).inputs("upload-1"),
            "revision": db.revision(),
        }
    finally:
        db.close()


def _index(cfg) -> tuple[str | None, dict | None]:
    root = Path(cfg.indexing.dir)
    name = current_name(root)
    return name, None if name is None else read_manifest(root / "versions" / name)


def _modes(folder: Path) -> set[str]:
    """Files and folders under ``folder`` whose mode is not 0600 / 0700."""
    bad = {str(folder)} if stat.S_IMODE(folder.stat().st_mode) != 0o700 else set()
    for p in folder.rglob("*"):
        want = 0o700 if p.is_dir() else 0o600
        if stat.S_IMODE(p.stat().st_mode) != want:
            bad.add(f"{p} {oct(stat.S_IMODE(p.stat().st_mode))}")
    return bad


def _timed(capsys, what: str, t0: float, extra: str = "") -> None:
    with capsys.disabled():
        print(f"\n  [timing] {what}: {time.perf_counter() - t0:.3f} s{extra}")


# ---------------------------------------------------------------------------------------------
# a backup, taken while usage is being written, restored into a fresh config


@pytest.mark.parametrize("kind", KINDS)
def test_backup_while_writing_then_restore_into_a_fresh_config_reads_back_the_same(kind, tmp_path, request, capsys):
    cfg = _config(tmp_path / "a", kind, request)
    ids = _populate(cfg, tmp_path / "a")
    before = _read_back(cfg, ids, tmp_path / "a" / "spool")
    assert before["key"] == (ids["key"], "admin", 100_000, 30.0) and before["job"] is not None
    assert len(before["conversation"]["turns"]) == 3 and len(before["feedback"]) == 2
    assert before["upload"]["status"] == "queued" and len(before["upload_inputs"][1]) == 2

    # another key's usage is recorded all through the backup
    db = Database(url_of(cfg))
    _, load = SqlKeys(db).create("load")
    usage, stop, written = SqlUsage(db), threading.Event(), []

    def write() -> None:
        while not stop.is_set():
            usage.record(load.id, prompt_tokens=3, completion_tokens=2, request_id=f"w-{len(written)}", now=NOW)
            written.append(1)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    while len(written) < 20:
        time.sleep(0.01)
    t0 = time.perf_counter()
    try:
        record = backup(cfg, tmp_path / "bk")
    finally:
        stop.set()
        writer.join(10)
    during = len(written)
    _timed(capsys, f"backup ({kind})", t0, f", {len(record['files'])} files, {record['bytes']} bytes, "
           f"{during} usage records written meanwhile")
    db.close()

    bk = tmp_path / "bk"
    on_disk = json.loads((bk / BACKUP_JSON).read_text())
    assert on_disk["state"]["kind"] == kind and on_disk["state"]["revision"] == head_revision()
    assert on_disk["state"]["source"] == describe(url_of(cfg))
    assert on_disk["index"]["version"] == current_name(Path(cfg.indexing.dir))
    listed = {p.relative_to(bk).as_posix() for p in bk.rglob("*") if p.is_file() and p.name != BACKUP_JSON}
    assert set(on_disk["files"]) == listed and len(listed) > 5
    assert not _modes(bk), _modes(bk)  # 0700 folders, 0600 files: the keys' hashes are secrets
    if kind == "sqlite":  # the snapshot opens on its own and knows its revision
        import sqlite3

        snap = sqlite3.connect(bk / "state.sqlite3")
        assert snap.execute("SELECT version_num FROM alembic_version").fetchone() == (head_revision(),)
        assert snap.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        snap.close()

    cfg2 = _config(tmp_path / "b", kind, request)
    t0 = time.perf_counter()
    result = restore(cfg2, bk)
    _timed(capsys, f"restore ({kind})", t0)
    assert result["state"]["revision"] == head_revision() and result["state"]["upgraded_to"] is None
    assert _read_back(cfg2, ids, tmp_path / "b" / "spool") == before
    assert _index(cfg2) == _index(cfg)
    name, manifest = _index(cfg2)
    verify_files(Path(cfg2.indexing.dir) / "versions" / name, manifest)

    # the snapshot is one commit: the load key's day and month rows and its request ids agree
    db2 = Database(url_of(cfg2))
    u = SqlUsage(db2).usage(load.id, now=NOW)
    n_ids = db2.execute("SELECT COUNT(*) FROM usage_requests WHERE key_id = :k", {"k": load.id})[0][0]
    db2.close()
    assert 20 <= u["day"]["requests"] == u["month"]["requests"] == n_ids <= during
    assert u["day"]["total_tokens"] == 5 * n_ids


def test_a_backup_of_an_older_schema_is_upgraded_after_restoring(tmp_path, request):
    cfg = _config(tmp_path / "a", "sqlite", request)
    db = Database(url_of(cfg))
    db.upgrade("0002")
    db.close()
    backup(cfg, tmp_path / "bk")
    assert json.loads((tmp_path / "bk" / BACKUP_JSON).read_text())["state"]["revision"] == "0002"
    cfg2 = _config(tmp_path / "b", "sqlite", request)
    r = restore(cfg2, tmp_path / "bk")
    assert (r["state"]["revision"], r["state"]["upgraded_to"]) == ("0002", head_revision())
    assert r["index"] is None


def test_postgres_a_backup_of_an_older_schema_restores_into_a_database_already_at_head(tmp_path, request):
    """The target was made by a service that started once (schema head, no rows: empty): the
    tables the older backup lacks are dropped, and the upgrade after the restore makes them again."""
    cfg = _config(tmp_path / "a", "postgresql", request)
    db = Database(url_of(cfg))
    db.upgrade("0002")
    SqlKeys(db).create("alice")
    db.close()
    backup(cfg, tmp_path / "bk")
    cfg2 = _config(tmp_path / "b", "postgresql", request)
    Database(url_of(cfg2)).upgrade()
    r = restore(cfg2, tmp_path / "bk")
    assert (r["state"]["revision"], r["state"]["upgraded_to"]) == ("0002", head_revision())
    db2 = Database(url_of(cfg2))
    assert [k.name for k in SqlKeys(db2).list()] == ["alice"]
    with db2.read() as c:
        assert "index_serving" in inspect(c).get_table_names()
    db2.close()


# ---------------------------------------------------------------------------------------------
# refusals: nothing changes


def _untouched(cfg, kind: str) -> None:
    """The fresh target of ``cfg`` as it was: no state, no index."""
    if kind == "sqlite":
        assert not Path(cfg.governor.db).exists()
    else:
        db = Database(url_of(cfg))
        with db.read() as c:
            assert inspect(c).get_table_names() == []
        db.close()
    assert current_name(Path(cfg.indexing.dir)) is None


@pytest.mark.parametrize(("kind", "damage"), [("sqlite", "corrupt index file"), ("sqlite", "missing state file"),
                                              ("postgresql", "corrupt state file")])
def test_a_damaged_backup_is_refused_and_the_target_left_untouched(kind, damage, tmp_path, request):
    cfg = _config(tmp_path / "a", kind, request)
    _populate(cfg, tmp_path / "a")
    bk = tmp_path / "bk"
    backup(cfg, bk)
    state_file = bk / ("state.sqlite3" if kind == "sqlite" else "state.pgdump")
    if damage == "corrupt index file":
        victim = next((bk / "index").rglob("vectors.npy"))
    else:
        victim = state_file
    if damage.startswith("missing"):
        victim.unlink()
        match = "missing"
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        match = "sha256 differs"
    cfg2 = _config(tmp_path / "b", kind, request)
    with pytest.raises(BackupError, match=match):
        restore(cfg2, bk)
    with pytest.raises(BackupError, match=match):
        restore(cfg2, bk, force=True)
    _untouched(cfg2, kind)
    assert not (Path(cfg2.indexing.dir)).exists()  # not even a staged copy of the version


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_empty_target_is_replaced_only_with_force(kind, tmp_path, request):
    cfg = _config(tmp_path / "a", kind, request)
    ids = _populate(cfg, tmp_path / "a")
    backup(cfg, tmp_path / "bk")
    expected = _read_back(cfg, ids, tmp_path / "a" / "spool")

    cfg2 = _config(tmp_path / "b", kind, request)
    other = _populate(cfg2, tmp_path / "b")
    theirs = _read_back(cfg2, other, tmp_path / "b" / "spool")
    live = _index(cfg2)
    with pytest.raises(BackupError, match=r"not empty: .*1 API keys and 2 usage rows.*live index version.*--force"):
        restore(cfg2, tmp_path / "bk")
    assert _read_back(cfg2, other, tmp_path / "b" / "spool") == theirs and _index(cfg2) == live

    restore(cfg2, tmp_path / "bk", force=True)
    assert _read_back(cfg2, ids, tmp_path / "b" / "spool") == expected
    assert _read_back(cfg2, other, tmp_path / "b" / "spool")["key"] is None  # the target's own key is gone
    assert _index(cfg2) == _index(cfg)


def test_a_backup_refuses_a_non_empty_folder_and_a_file(tmp_path, request):
    cfg = _config(tmp_path / "a", "sqlite", request)
    _populate(cfg, tmp_path / "a")
    (tmp_path / "bk").mkdir()
    (tmp_path / "bk" / "notes.txt").write_text("keep me")
    with pytest.raises(BackupError, match="not empty"):
        backup(cfg, tmp_path / "bk")
    assert [p.name for p in (tmp_path / "bk").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(BackupError, match="not a folder"):
        backup(cfg, tmp_path / "file")
    (tmp_path / "empty").mkdir(mode=0o755)
    backup(cfg, tmp_path / "empty")  # an empty folder will do, made private
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o700


def test_a_missing_sqlite_state_is_not_backed_up_and_leaves_no_folder(tmp_path, request):
    cfg = _config(tmp_path / "a", "sqlite", request)
    with pytest.raises(BackupError, match="does not exist"):
        backup(cfg, tmp_path / "bk")
    assert not (tmp_path / "bk").exists()


@pytest.mark.parametrize(("source", "target"), [("sqlite", "postgresql"), ("postgresql", "sqlite")])
def test_a_backup_restores_only_into_the_same_database_kind(source, target, tmp_path, request):
    cfg = _config(tmp_path / "a", source, request)
    _populate(cfg, tmp_path / "a")
    backup(cfg, tmp_path / "bk")
    cfg2 = _config(tmp_path / "b", target, request)
    with pytest.raises(BackupError, match=f"backup of a {source} state.*database is {target}"):
        restore(cfg2, tmp_path / "bk")
    _untouched(cfg2, target)


def test_a_schema_newer_than_the_code_is_refused(tmp_path, request):
    cfg = _config(tmp_path / "a", "sqlite", request)
    _populate(cfg, tmp_path / "a")
    backup(cfg, tmp_path / "bk")
    record = json.loads((tmp_path / "bk" / BACKUP_JSON).read_text())
    record["state"]["revision"] = "0999_from_the_future"
    (tmp_path / "bk" / BACKUP_JSON).write_text(json.dumps(record))
    cfg2 = _config(tmp_path / "b", "sqlite", request)
    with pytest.raises(BackupError, match=f"newer than this code knows .*{head_revision()}"):
        restore(cfg2, tmp_path / "bk", force=True)
    _untouched(cfg2, "sqlite")


def test_a_folder_without_backup_json_is_not_a_backup(tmp_path, request):
    (tmp_path / "bk").mkdir()
    cfg = _config(tmp_path / "b", "sqlite", request)
    with pytest.raises(BackupError, match="not a complete ragraph backup"):
        restore(cfg, tmp_path / "bk")


# ---------------------------------------------------------------------------------------------
# the command line


def _ragraph(env: dict[str, str], home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent,
                          env={**env, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)})


def test_ragraph_backup_and_restore_commands(tmp_path, request, capsys):
    env_a = _env(tmp_path / "a", "sqlite", request)
    ids = _populate(load_config(environ=env_a), tmp_path / "a")
    t0 = time.perf_counter()
    out = _ragraph(env_a, tmp_path, "backup", str(tmp_path / "bk"))
    _timed(capsys, "ragraph backup (sqlite, CLI process)", t0)
    assert out.returncode == 0, out.stderr
    assert "state: sqlite" in out.stderr and "index: v" in out.stderr and "checksums:" in out.stderr, out.stderr
    assert "backed up schema" in out.stdout

    again = _ragraph(env_a, tmp_path, "backup", str(tmp_path / "bk"))
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not empty" in again.stderr and "Traceback" not in again.stderr

    env_b = _env(tmp_path / "b", "sqlite", request)
    t0 = time.perf_counter()
    out = _ragraph(env_b, tmp_path, "restore", str(tmp_path / "bk"))
    _timed(capsys, "ragraph restore (sqlite, CLI process)", t0)
    assert out.returncode == 0, out.stderr
    assert "checked:" in out.stderr and "state:" in out.stderr and "is live" in out.stderr, out.stderr
    cfg_b = load_config(environ=env_b)
    assert _read_back(cfg_b, ids, tmp_path / "b" / "spool")["key"][0] == ids["key"]

    refused = _ragraph(env_b, tmp_path, "restore", str(tmp_path / "bk"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the target is not empty") and "--force" in last
    forced = _ragraph(env_b, tmp_path, "restore", str(tmp_path / "bk"), "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(CORPUS) == read_manifest(Path(cfg_b.indexing.dir) / "versions" / _index(cfg_b)[0])["documents"]


def test_the_pg_tools_get_the_password_in_the_environment_only(monkeypatch, tmp_path):
    from state import backup as b

    dbname, env = b._libpq("postgresql+psycopg://ragraph:s3cret@db.example:5433/ragraph?sslmode=require", 3)
    assert dbname == "postgresql://ragraph@db.example:5433/ragraph?sslmode=require"
    assert env["PGPASSWORD"] == "s3cret" and "s3cret" not in dbname
    seen = []
    monkeypatch.setattr(b.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or subprocess.CompletedProcess(
        cmd, 1, "", "pg_dump: error: connection refused"))
    monkeypatch.setattr(b, "_pg_tool", lambda name: f"/usr/bin/{name}")
    with pytest.raises(BackupError, match="connection refused") as e:
        b._pg_dump("postgresql+psycopg://ragraph:s3cret@db.example/ragraph", tmp_path / "x", timeout_s=3)
    assert "s3cret" not in str(e.value) and seen and not any("s3cret" in arg for arg in seen[0])
