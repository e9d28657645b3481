"""Upgrading a deployed database: a governor file made by the code before migrations (its schema
copied below as that code wrote it, with rows) is brought to the schema head by one command,
``ragraph db upgrade``, every row kept; upgrading again changes nothing. PostgreSQL starts empty
and gets the whole schema the same way."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from sqlalchemy import inspect

from state.db import Database, head_revision, sqlite_url

# deployments/auth.py and deployments/conversations.py before migrations (their CREATE statements)
PRE_MIGRATION_SCHEMA = """CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    token_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    chat_per_min REAL,
    search_per_min REAL,
    other_per_min REAL,
    daily_tokens INTEGER,
    monthly_tokens INTEGER,
    daily_budget REAL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    period TEXT NOT NULL,          -- 'YYYY-MM-DD' (UTC day) or 'YYYY-MM' (UTC month)
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    prefill_s REAL NOT NULL DEFAULT 0,   -- engine seconds: prompt processing (to the first token)
    decode_s REAL NOT NULL DEFAULT 0,    -- engine seconds: the rest of the answer
    cost REAL NOT NULL DEFAULT 0,        -- governor.pricing at the time of each request
    PRIMARY KEY (key_id, period)
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    conversation_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    rag TEXT NOT NULL,             -- JSON: sources and metadata (status, timings_ms, ...)
    created REAL NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE TABLE IF NOT EXISTS chat_requests (
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL,
    conversation_id TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (owner, request_id)
);
CREATE TABLE IF NOT EXISTS feedback (
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL,
    conversation_id TEXT,
    score INTEGER NOT NULL,
    comment TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (owner, request_id)
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
CREATE INDEX IF NOT EXISTS chat_requests_created ON chat_requests (created);
CREATE INDEX IF NOT EXISTS feedback_updated ON feedback (updated);
CREATE INDEX IF NOT EXISTS feedback_conversation ON feedback (conversation_id);
"""

HEAD_TABLES = {"api_keys", "usage", "usage_requests", "conversations", "turns", "chat_requests", "feedback", "jobs",
               "index_serving", "alembic_version"}


def old_file(path) -> None:
    db = sqlite3.connect(path)
    db.executescript(PRE_MIGRATION_SCHEMA)
    now = time.time()
    db.execute("INSERT INTO api_keys (id, name, scope, token_sha256, created, daily_tokens) "
               "VALUES ('abcd1234', 'alice', 'user', 'ff', ?, 500)", (now,))
    db.execute("INSERT INTO usage VALUES ('abcd1234', '2026-12-07', 3, 30, 12, 0.1, 0.2, 0.5)")
    db.execute("INSERT INTO conversations VALUES ('conv_1', 'abcd1234', 'a title', ?, ?)", (now, now))
    db.execute("INSERT INTO turns VALUES ('conv_1', 1, 'r1', 'q', 'a', '{}', ?)", (now,))
    db.execute("INSERT INTO chat_requests VALUES ('abcd1234', 'r1', 'conv_1', ?)", (now,))
    db.execute("INSERT INTO feedback VALUES ('abcd1234', 'r1', 'conv_1', 1, 'good', ?, ?)", (now, now))
    db.commit()
    db.close()


def test_ragraph_db_upgrade_brings_a_pre_migration_file_to_head_with_its_rows(tmp_path):
    path = tmp_path / "governor.sqlite3"
    old_file(path)
    db = Database(sqlite_url(path))
    assert db.revision() is None
    out = subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade"], capture_output=True, text=True,
                         env={"RAGRAPH__GOVERNOR__DB": str(path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert db.revision() == head_revision()
    with db.read() as c:
        assert HEAD_TABLES <= set(inspect(c).get_table_names())
    assert db.execute("SELECT id, name, daily_tokens, daily_budget FROM api_keys") == [("abcd1234", "alice", 500, None)]
    assert db.execute("SELECT requests, prompt_tokens, cost FROM usage") == [(3, 30, 0.5)]
    assert db.execute("SELECT t.question, f.comment FROM turns t JOIN feedback f USING (request_id)") == [("q", "good")]
    again = subprocess.run([sys.executable, "-m", "cli.main", "db", "upgrade"], capture_output=True, text=True,
                           env={"RAGRAPH__GOVERNOR__DB": str(path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                           timeout=120)
    assert again.returncode == 0 and "already" in again.stdout, again.stdout + again.stderr
    db.close()


def test_an_empty_postgres_gets_the_same_schema(postgres_url):
    from state_fixtures import fresh_postgres

    db = Database(fresh_postgres(postgres_url))
    assert db.upgrade() == (None, head_revision())
    with db.read() as c:
        assert HEAD_TABLES <= set(inspect(c).get_table_names())
    assert db.upgrade() == (head_revision(), head_revision())
    db.close()


def test_manual_migrate_refuses_a_schema_behind_the_code(tmp_path, local_cfg):
    import pytest

    from state.db import StateError, close_all, open_database

    path = tmp_path / "g.sqlite3"
    Database(sqlite_url(path)).upgrade("0001")
    cfg = local_cfg.model_copy(update={
        "governor": local_cfg.governor.model_copy(update={"db": path}),
        "state": local_cfg.state.model_copy(update={"migrate": "manual"})})
    close_all()
    with pytest.raises(StateError, match="ragraph db upgrade"):
        open_database(cfg)
