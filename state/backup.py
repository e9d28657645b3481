"""Backing up and restoring what the service keeps: the state database and the live index version
(``ragraph backup DIR``, ``ragraph restore DIR [--force]``; docs/operations.md).

A backup is one folder (0700, its files 0600: the API keys' hashes are secrets)::

    DIR/backup.json                  format, created_at, schema revision, source, index version, sha256 of every file
    DIR/state.sqlite3                a SQLite state: an online snapshot (sqlite3's backup API), one file
    DIR/state.pgdump                 a PostgreSQL state: ``pg_dump --format=custom``
    DIR/index/<version>/...          the live index version as published (its files and manifest.json)
    DIR/spool/<job>/...              the uploaded files of the ingest jobs that had not ended (documents.spool_dir)

* SQLite: the snapshot is taken in one step of sqlite3's backup API, inside one read transaction
  of the source: the service may write meanwhile (WAL), the copy is the database as of one commit.
  The schema revision recorded is read from the copy itself.
* PostgreSQL: ``pg_dump`` reads in one snapshot of its own; the revision recorded is read back out
  of the dump (``pg_restore --data-only --table alembic_version``). The password travels in
  ``PGPASSWORD``, never on a command line.
* The spool: copied after the database, so every job of the snapshot that was still waiting has its
  files in the copy (they are written, fsync'd, before the job's row is committed); a job that ends
  meanwhile leaves no folder, and a folder of a job not in the snapshot is swept by the restored
  service (:meth:`state.jobs.SqlJobs.sweep`).
* The index: versions are immutable once published, so the live one is copied file by file and
  the copy checked against its manifest (a version pruned or damaged meanwhile fails the backup).

:func:`restore` checks every file against ``backup.json`` first, then the schema revision (one
newer than this code's is refused), the database kinds (a SQLite backup restores into SQLite, a
PostgreSQL one into PostgreSQL) and the target (one that holds API keys, usage, or a live index is
replaced only with ``force``); a refusal changes nothing. Then the index version is copied beside
the target's (hidden), the database restored (SQLite: the backup API into the target file, which
replaces its content in one transaction; PostgreSQL: ``pg_restore --clean --if-exists --no-owner
--single-transaction``), its schema upgraded to the code's head when the backup is older, the
spooled uploads copied into the target's spool (a folder of the same job replaced), and the
version published and made live as a rollback makes one live (one atomic rename of ``current``).
Restore with the service stopped: its connections would hold locks the restore waits for, and
its caches would not see the restored state.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, make_url

from common.files import private_dir, private_file
from common.manifest import sha256_file
from indexing.store import (
    IndexBuildError,
    IndexLoadError,
    RollbackError,
    current_name,
    fsync_dir,
    read_manifest,
    rollback,
    settings_of,
    verify_files,
)
from state.db import MIGRATIONS, Database, StateError, describe, head_revision, url_of
from state.jobs import spool_dir

FORMAT = "ragraph-backup"
FORMAT_VERSION = 1
BACKUP_JSON = "backup.json"
SQLITE_FILE = "state.sqlite3"
PG_FILE = "state.pgdump"
INDEX_DIR = "index"
SPOOL_DIR = "spool"
Log = Callable[[str], None]


class BackupError(StateError):
    """A backup or restore cannot be made or was refused; the message says why and what to do."""


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# backup


def backup(cfg, dest: Path, *, log: Log = _quiet) -> dict[str, Any]:
    """Write a backup of ``cfg``'s state database and live index version into ``dest`` (a folder
    that does not exist or is empty); returns what ``backup.json`` records plus ``bytes`` and
    ``seconds``. Raises :class:`BackupError` (or :class:`StateError`: the database did not answer)."""
    t0 = time.perf_counter()
    dest = Path(dest).expanduser()
    url = url_of(cfg)
    kind = _kind(url)
    created = _prepare_dest(dest)
    try:
        t = time.perf_counter()
        if kind == "sqlite":
            state_file = SQLITE_FILE
            revision = _sqlite_snapshot(_sqlite_path(url), dest / SQLITE_FILE)
        else:
            state_file = PG_FILE
            revision = _pg_dump(url, dest / PG_FILE, timeout_s=cfg.state.connect_timeout_s)
        size = (dest / state_file).stat().st_size
        log(f"state: {kind} {describe(url)} -> {state_file}, schema {revision or '(none)'}, "
            f"{_bytes(size)} in {time.perf_counter() - t:.2f} s")

        t = time.perf_counter()
        spool = _copy_spool(spool_dir(cfg), dest / SPOOL_DIR)
        if spool["jobs"]:
            log(f"spool: {spool['jobs']} waiting jobs' uploads, {spool['files']} files, {_bytes(spool['bytes'])} "
                f"in {time.perf_counter() - t:.2f} s")

        t = time.perf_counter()
        index = _copy_live_index(Path(cfg.indexing.dir).expanduser(), dest / INDEX_DIR)
        if index is None:
            log(f"index: no version is live in {Path(cfg.indexing.dir).expanduser()}; the backup holds none")
        else:
            log(f"index: {index['version']} -> {INDEX_DIR}/{index['version']}/, {index['files']} files, "
                f"{_bytes(index['bytes'])} in {time.perf_counter() - t:.2f} s (checksums verified)")

        t = time.perf_counter()
        files = {p.relative_to(dest).as_posix(): sha256_file(p)
                 for p in sorted(dest.rglob("*")) if p.is_file() and p.name != BACKUP_JSON}
        total = sum((dest / f).stat().st_size for f in files)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "state": {"kind": kind, "source": describe(url), "file": state_file, "revision": revision,
                      "code_head": head_revision()},
            "index": index and {k: v for k, v in index.items() if k not in ("files", "bytes")},
            "spool": {"jobs": spool["jobs"]},
            "files": files,
        }
        _write_private(dest / BACKUP_JSON, json.dumps(record, indent=2) + "\n")
        for folder in sorted({(dest / f).parent for f in files} | {dest}, reverse=True):
            fsync_dir(folder)
        log(f"checksums: {len(files)} files, {_bytes(total)} in {time.perf_counter() - t:.2f} s -> {BACKUP_JSON}")
    except BaseException:
        _undo_dest(dest, created)
        raise
    return {**record, "bytes": total, "seconds": round(time.perf_counter() - t0, 3), "dir": str(dest)}


def _prepare_dest(dest: Path) -> bool:
    """Make ``dest`` (0700); True when it was made here. One that exists must be an empty folder."""
    if dest.exists() or dest.is_symlink():
        if not dest.is_dir() or dest.is_symlink():
            raise BackupError(f"{dest} exists and is not a folder; back up into a new folder")
        if any(dest.iterdir()):
            raise BackupError(f"{dest} is not empty; back up into a new (or empty) folder, "
                              "a backup never writes over another")
        if dest.stat().st_uid == os.getuid():
            os.chmod(dest, 0o700)
        return False
    private_dir(dest)
    return True


def _undo_dest(dest: Path, created: bool) -> None:
    """Remove what a failed backup wrote (the folder too when it made it)."""
    if created:
        shutil.rmtree(dest, ignore_errors=True)
        return
    for p in dest.iterdir() if dest.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _sqlite_snapshot(source: Path, out: Path) -> str | None:
    """Copy the SQLite database ``source`` into ``out`` as of one commit (the backup API in one
    step: one read transaction of the source; writers go on meanwhile, WAL); returns the copy's
    schema revision."""
    if not source.is_file():
        raise BackupError(f"the state database {source} does not exist: nothing to back up (is this the "
                          "config the service runs with? --config, state.url, governor.db)")
    _create_private(out)
    try:
        src = sqlite3.connect(str(source), timeout=30)
        try:
            src.execute("PRAGMA busy_timeout = 30000")
            dst = sqlite3.connect(str(out))
            try:
                src.backup(dst)  # pages=-1: every page in one step, one snapshot
                mode = dst.execute("PRAGMA journal_mode = DELETE").fetchone()[0]  # one self-contained file
                if str(mode).lower() != "delete":
                    raise BackupError(f"{out}: the copy kept journal mode {mode!r}")
                if (ok := dst.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                    raise BackupError(f"{out}: the copy fails SQLite's quick_check ({ok}); is {source} damaged?")
                return _sqlite_revision(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise BackupError(f"copying the SQLite state {source} failed: {e}") from None


def _sqlite_revision(conn: sqlite3.Connection) -> str | None:
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'").fetchone():
        return None
    row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _pg_dump(url: str, out: Path, *, timeout_s: float) -> str | None:
    """``pg_dump --format=custom`` of ``url`` into ``out``; the schema revision the dump holds."""
    dbname, env = _libpq(url, timeout_s)
    _create_private(out)
    _run([_pg_tool("pg_dump"), "--format=custom", "--no-password", "--file", str(out), "--dbname", dbname],
         env, f"pg_dump of {describe(url)}")
    os.chmod(out, 0o600)
    return _dump_revision(out)


def _dump_revision(dump: Path) -> str | None:
    """The row of ``alembic_version`` in a custom-format dump (None when it has no such table)."""
    tables = _dump_tables(dump)
    if "alembic_version" not in tables:
        return None
    sql = _run([_pg_tool("pg_restore"), "--data-only", "--table", "alembic_version", "--file", "-", str(dump)],
               None, f"reading {dump}")
    rows, inside = [], False
    for line in sql.splitlines():
        if line.startswith("COPY ") and "alembic_version" in line:
            inside = True
        elif inside and line == "\\.":
            break
        elif inside:
            rows.append(line.strip())
    return rows[0] if rows else None


def _dump_tables(dump: Path) -> set[str]:
    """The tables of schema ``public`` in a custom-format dump (``pg_restore --list``)."""
    listing = _run([_pg_tool("pg_restore"), "--list", str(dump)], None, f"reading {dump}")
    return {m.group(1) for m in re.finditer(r"^\d+; \d+ \d+ TABLE public (\S+) ", listing, re.MULTILINE)}


def _copy_live_index(root: Path, out: Path) -> dict[str, Any] | None:
    """Copy the live version of the index ``root`` into ``out/<name>/`` and check the copy against
    its manifest; what ``backup.json`` records of it (None when no version is live)."""
    name = current_name(root)
    if name is None:
        return None
    folder = root / "versions" / name
    try:
        manifest = read_manifest(folder)
        copy = out / name
        n, size = _copy_tree(folder, copy)
        verify_files(copy, read_manifest(copy))
    except (IndexLoadError, OSError) as e:
        raise BackupError(f"copying the live index version {folder} failed: {e}; (a version pruned or "
                          "rebuilt meanwhile: run the backup again)") from None
    return {"version": name, "source": str(root), "created_at": manifest["created_at"],
            "documents": manifest["documents"], "chunks": manifest["chunks"], "files": n, "bytes": size}


# ---------------------------------------------------------------------------------------------
# restore


def restore(cfg, src: Path, *, force: bool = False, log: Log = _quiet) -> dict[str, Any]:
    """Restore the backup ``src`` into ``cfg``'s state database and index folder; returns what was
    done. Everything is checked before anything changes: every file's sha256, the schema revision
    (not newer than the code's), the kinds (SQLite into SQLite, PostgreSQL into PostgreSQL) and,
    unless ``force``, that the target is empty (no API key, no usage row, no live index version)."""
    t0 = time.perf_counter()
    src = Path(src).expanduser()
    url = url_of(cfg)
    root = Path(cfg.indexing.dir).expanduser()
    spool = spool_dir(cfg)

    t = time.perf_counter()
    record = _read_record(src)
    total = _check_files(src, record)
    log(f"checked: {len(record['files'])} files, {_bytes(total)} match {BACKUP_JSON} "
        f"({time.perf_counter() - t:.2f} s)")
    state = record["state"]
    kind = _kind(url)
    if state["kind"] != kind:
        raise BackupError(f"{src} is a backup of a {state['kind']} state ({state['source']}) and this config's state "
                          f"database is {kind} ({describe(url)}): a restore goes into the same kind; moving between "
                          "SQLite and PostgreSQL is not supported")
    revision = state.get("revision")
    if revision is not None and revision not in _known_revisions():
        raise BackupError(f"{src} holds schema revision {revision}, newer than this code knows (its head is "
                          f"{head_revision()}): restore it with the ragraph release that made it, or a later one")
    index = record.get("index")
    if not force:
        why = _not_empty(url, root, kind, cfg.state.connect_timeout_s)
        if why:
            raise BackupError(f"the target is not empty: {'; '.join(why)}. A restore replaces it: run it again with "
                              "--force to do so (stop the service first)")

    staged = None
    try:
        if index is not None:
            t = time.perf_counter()
            staged, manifest = _stage_index(src / INDEX_DIR / index["version"], root, index["version"])
            log(f"index: staged {index['version']} in {root} ({time.perf_counter() - t:.2f} s)")
        t = time.perf_counter()
        if kind == "sqlite":
            _sqlite_restore(src / state["file"], _sqlite_path(url))
        else:
            _pg_restore(src / state["file"], url, timeout_s=cfg.state.connect_timeout_s, log=log)
        db = Database(url, connect_timeout_s=cfg.state.connect_timeout_s)
        try:
            restored = db.revision()
            upgraded = None
            if restored != head_revision():
                _, upgraded = db.upgrade()
        finally:
            db.close()
        log(f"state: {state['file']} -> {kind} {describe(url)}, schema {restored or '(none)'}"
            + (f", upgraded to {upgraded}" if upgraded else "") + f" ({time.perf_counter() - t:.2f} s)")
        jobs = _restore_spool(src / SPOOL_DIR, spool)
        if jobs:
            log(f"spool: {jobs} waiting jobs' uploads -> {spool}")
        if staged is not None:
            t = time.perf_counter()
            previous = _publish_index(staged, root, index["version"], manifest)
            staged = None
            log(f"index: {index['version']} is live in {root} (was: {previous or 'none'}; "
                f"{time.perf_counter() - t:.2f} s)")
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    return {"dir": str(src), "state": {"kind": kind, "target": describe(url), "revision": restored,
                                       "upgraded_to": upgraded},
            "index": None if index is None else {"version": index["version"], "dir": str(root)},
            "spool": {"jobs": jobs, "dir": str(spool)},
            "files": len(record["files"]), "bytes": total, "seconds": round(time.perf_counter() - t0, 3)}


def _read_record(src: Path) -> dict[str, Any]:
    path = src / BACKUP_JSON
    if not src.is_dir():
        raise BackupError(f"{src} {'is not a folder' if src.exists() else 'does not exist'}; give the folder "
                          "`ragraph backup` wrote")
    if not path.is_file():
        raise BackupError(f"{path} is missing: {src} is not a complete ragraph backup (an interrupted backup has "
                          "no backup.json)")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BackupError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BackupError(f"{path} is not a ragraph backup record")
    if record.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{path}: backup format {record.get('format_version')!r}, this ragraph reads "
                          f"{FORMAT_VERSION}")
    files, state, index = record.get("files"), record.get("state"), record.get("index")
    if not isinstance(files, dict) or not isinstance(state, dict) or state.get("kind") not in ("sqlite", "postgresql") \
            or state.get("file") not in (SQLITE_FILE, PG_FILE) or not (index is None or isinstance(index, dict)):
        raise BackupError(f"{path} lacks its files, state or index record")
    for rel in files:
        if not isinstance(rel, str) or rel.startswith("/") or ".." in rel.split("/") or rel == BACKUP_JSON:
            raise BackupError(f"{path} lists a file outside the backup: {rel!r}")
    if state["file"] not in files:
        raise BackupError(f"{path} does not list the state file {state['file']}")
    if index is not None:
        name = index.get("version")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise BackupError(f"{path}: bad index version {name!r}")
        if f"{INDEX_DIR}/{name}/manifest.json" not in files:
            raise BackupError(f"{path} does not list {INDEX_DIR}/{name}/manifest.json")
    return record


def _check_files(src: Path, record: dict[str, Any]) -> int:
    """Every file ``backup.json`` lists, present with its sha256; their total size."""
    total = 0
    for rel, digest in sorted(record["files"].items()):
        p = src / rel
        if not p.is_file():
            raise BackupError(f"{p} is missing from the backup; nothing was restored")
        if sha256_file(p) != digest:
            raise BackupError(f"{p}: sha256 differs from {src / BACKUP_JSON}, the backup is damaged; nothing was "
                              "restored")
        total += p.stat().st_size
    return total


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions()}


def _not_empty(url: str, root: Path, kind: str, timeout_s: float) -> list[str]:
    """Why the target is not empty (API keys, usage rows, a live index version); [] when it is."""
    why = []
    keys = usage = 0
    if kind == "sqlite":
        path = _sqlite_path(url)
        if path.is_file():
            try:
                conn = sqlite3.connect(str(path), timeout=30)
                try:
                    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    keys = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] if "api_keys" in names else 0
                    usage = conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] if "usage" in names else 0
                finally:
                    conn.close()
            except sqlite3.Error as e:
                raise BackupError(f"cannot read the target state {path}: {e}") from None
    else:
        db = Database(url, connect_timeout_s=timeout_s)
        try:
            with db.read() as c:
                names = set(inspect(c).get_table_names())
                if "api_keys" in names:
                    keys = c.execute(text("SELECT COUNT(*) FROM api_keys")).scalar_one()
                if "usage" in names:
                    usage = c.execute(text("SELECT COUNT(*) FROM usage")).scalar_one()
        finally:
            db.close()
    if keys or usage:
        why.append(f"{describe(url)} holds {keys} API keys and {usage} usage rows")
    if (live := current_name(root)) is not None:
        why.append(f"{root} has a live index version ({live})")
    return why


def _sqlite_restore(backup_file: Path, target: Path) -> None:
    """The backup's content into ``target`` (made 0600 when missing) through the backup API: the
    target's content is replaced in one transaction, its WAL handled by SQLite (a file copied over
    a database would meet the old database's -wal file)."""
    private_file(target)
    try:
        src = sqlite3.connect(f"{backup_file.resolve().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(str(target), timeout=30)
            try:
                dst.execute("PRAGMA busy_timeout = 30000")
                src.backup(dst)
                dst.execute("PRAGMA journal_mode = WAL")
                if (ok := dst.execute("PRAGMA quick_check").fetchone()[0]) != "ok":
                    raise BackupError(f"{target}: the restored database fails SQLite's quick_check ({ok})")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise BackupError(f"restoring into the SQLite state {target} failed: {e} (is the service still running? "
                          "stop it first)") from None
    private_file(target)  # its -wal/-shm


def _pg_restore(dump: Path, url: str, *, timeout_s: float, log: Log) -> None:
    """``pg_restore --clean --if-exists --no-owner`` of ``dump`` into ``url``, in one transaction.
    Tables of a newer schema than the dump's (the target was upgraded past the backup) are dropped
    first, so that the upgrade after the restore can make them again."""
    dump_tables = _dump_tables(dump)
    db = Database(url, connect_timeout_s=timeout_s)
    try:
        with db.read() as c:
            target = set(inspect(c).get_table_names())
        extra = sorted(target - dump_tables) if "alembic_version" in target else []
        if extra:
            with db.tx() as c:
                for name in extra:
                    c.execute(text(f'DROP TABLE IF EXISTS "{name}"'))
            log(f"state: dropped {', '.join(extra)} (a newer schema than the backup's; the upgrade makes them again)")
    finally:
        db.close()
    dbname, env = _libpq(url, timeout_s)
    _run([_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
          "--exit-on-error", "--no-password", "--dbname", dbname, str(dump)], env, f"pg_restore into {describe(url)}")


def _stage_index(folder: Path, root: Path, name: str) -> tuple[Path, dict[str, Any]]:
    """A copy of the backup's version in a hidden folder of ``root/versions`` (no build deletes it,
    no listing shows it), checked against its manifest."""
    versions = root / "versions"
    private_dir(versions)
    stage = versions / f".restore-{name}-{uuid.uuid4().hex[:8]}"
    try:
        manifest = read_manifest(folder)
        if manifest.get("name") != name:
            raise BackupError(f"{folder / 'manifest.json'} names version {manifest.get('name')!r}, not {name!r}")
        _copy_tree(folder, stage)
        verify_files(stage, manifest)
    except (IndexLoadError, OSError) as e:
        shutil.rmtree(stage, ignore_errors=True)
        raise BackupError(f"staging the index version {name} in {root} failed: {e}") from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage, manifest


def _publish_index(stage: Path, root: Path, name: str, manifest: dict[str, Any]) -> str | None:
    """Move the staged version to ``versions/<name>`` (replacing a folder of that name) and make it
    live (:func:`indexing.store.rollback`: checked again, ``current`` swapped atomically)."""
    versions = root / "versions"
    final = versions / name
    aside = None
    if final.exists():
        aside = versions / f".replaced-{name}-{uuid.uuid4().hex[:8]}"
        final.rename(aside)
    stage.rename(final)
    fsync_dir(versions)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    try:
        previous, _ = rollback(root, name, settings_of(manifest))  # its own embedder: only the pointer moves
    except (RollbackError, IndexBuildError) as e:
        raise BackupError(f"making the restored index version {name} live in {root} failed: {e}; the state is "
                          f"restored; once fixed, `ragraph index rollback {name}` makes it live") from None
    return previous


# ---------------------------------------------------------------------------------------------
# helpers


def _kind(url: str) -> str:
    backend = make_url(url).get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise BackupError(f"{describe(url)}: the state database is sqlite:/// or postgresql+psycopg://")
    return backend


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise BackupError(f"{describe(url)}: the state needs a SQLite file (sqlite:////path/state.sqlite3)")
    return Path(database).expanduser()


def _libpq(url: str, timeout_s: float) -> tuple[str, dict[str, str]]:
    """The libpq URL of a SQLAlchemy one (``postgresql+psycopg://`` -> ``postgresql://``) without its
    password, and the environment that carries the password (``PGPASSWORD``) to the tools."""
    u = make_url(url)
    env = dict(os.environ)
    if u.password:
        env["PGPASSWORD"] = str(u.password)
    env["PGCONNECT_TIMEOUT"] = str(max(2, round(timeout_s)))
    bare = URL.create("postgresql", username=u.username, host=u.host, port=u.port, database=u.database,
                      query=u.query)  # URL.set(password=None) would keep the password
    return bare.render_as_string(hide_password=False), env


def _version_of(exe: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else ()


@lru_cache(maxsize=None)
def _pg_tool(name: str) -> str:
    """The newest ``pg_dump``/``pg_restore`` installed: on PATH or in /usr/lib/postgresql/*/bin (a
    tool older than the server refuses to dump it)."""
    found = [p for p in glob.glob(f"/usr/lib/postgresql/*/bin/{name}") if os.access(p, os.X_OK)]
    if on_path := shutil.which(name):
        found.append(on_path)
    ranked = sorted(((_version_of(p), "/usr/lib/postgresql/" in p, p) for p in found), reverse=True)
    ranked = [r for r in ranked if r[0]]
    if not ranked:
        raise BackupError(f"{name} is not installed (not on PATH nor in /usr/lib/postgresql/*/bin): install the "
                          "PostgreSQL client tools of the server's version or newer (Debian: postgresql-client)")
    return ranked[0][2]


def _run(cmd: list[str], env: dict[str, str] | None, what: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        raise BackupError(f"{what}: cannot run {cmd[0]}: {e}") from None
    if out.returncode != 0:
        lines = [ln.strip() for ln in out.stderr.strip().splitlines() if ln.strip()]
        raise BackupError(f"{what} failed ({Path(cmd[0]).name} exit {out.returncode}): "
                          f"{' / '.join(lines[-3:]) or 'no message'}")
    return out.stdout


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.chmod(path, 0o600)


def _write_private(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_tree(src: Path, dst: Path, what: str = "an index version") -> tuple[int, int]:
    """Every regular file under ``src`` into ``dst`` (folders 0700, files 0600, each fsync'd);
    (files, bytes). A link is refused: ``what`` (a version, a job's spooled upload) holds none."""
    private_dir(dst)
    n = size = 0
    for top, dirs, files in os.walk(src):
        rel = Path(top).relative_to(src)
        for d in sorted(dirs):
            if (Path(top) / d).is_symlink():
                raise BackupError(f"{Path(top) / d} is a link; {what} holds none")
            (dst / rel / d).mkdir(mode=0o700)
            os.chmod(dst / rel / d, 0o700)
        for f in sorted(files):
            s = Path(top) / f
            if s.is_symlink() or not s.is_file():
                raise BackupError(f"{s} is not a regular file; {what} holds only files")
            fd = os.open(dst / rel / f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, 0o600)
            with open(s, "rb") as i, os.fdopen(fd, "wb") as o:
                shutil.copyfileobj(i, o, 1 << 20)
                o.flush()
                os.fsync(o.fileno())
                size += o.tell()
            n += 1
    for top, _, _ in os.walk(dst, topdown=False):
        fsync_dir(Path(top))
    return n, size


def _copy_spool(spool: Path, out: Path) -> dict[str, int]:
    """The spool's job folders (not the ``.tmp-`` ones of a submit under way) into ``out``; a folder
    that its job's end removes while it is copied is left out. {jobs, files, bytes}."""
    got = {"jobs": 0, "files": 0, "bytes": 0}
    if not spool.is_dir():
        return got
    for folder in sorted(spool.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            n, size = _copy_tree(folder, out / folder.name, "a job's spooled upload")
        except (FileNotFoundError, BackupError):
            if folder.exists():
                raise
            shutil.rmtree(out / folder.name, ignore_errors=True)  # the job ended meanwhile: nothing waits
            continue
        got["jobs"] += 1
        got["files"] += n
        got["bytes"] += size
    return got


def _restore_spool(src: Path, spool: Path) -> int:
    """The backup's spooled uploads into ``spool`` (0700), each job's folder copied beside it and
    renamed into place (one of the same name replaced); the number of jobs."""
    if not src.is_dir():
        return 0
    private_dir(spool)
    n = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        tmp = spool / f".tmp-restore-{folder.name}.{uuid.uuid4().hex[:8]}"
        _copy_tree(folder, tmp, "a job's spooled upload")
        old = spool / folder.name
        if old.exists():
            shutil.rmtree(old)
        tmp.rename(old)
        n += 1
    fsync_dir(spool)
    return n


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
