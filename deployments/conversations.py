"""Conversations, the chat requests that were answered, and feedback on them: per API key, in the
governor's SQLite file (the same file as the keys and the usage ledger, tables of their own).

* ``conversations`` and ``turns``: what the chat page lists and reopens. A turn is one question,
  its answer and a summary of its ``rag`` block (sources, status, timings), appended when a chat
  that named ``rag.conversation_id`` ends. An owner has at most ``max_conversations``
  (:class:`ConversationLimitError` past it: nothing is deleted for them) of at most ``max_turns``
  turns each (the oldest turns go first).
* ``chat_requests``: the request id of every answered chat and the key that asked, so that
  feedback on an unknown (or someone else's) request id is refused. Kept as long as conversations.
* ``feedback``: one row per owner and request id (sending again replaces the score and comment):
  what an operator exports (``GET /v1/feedback``). Deleted with its conversation, and
  ``feedback_retention_days`` after its last update.

Request ids are chosen by the client (``X-Request-ID``), so answered requests and feedback are
keyed by (owner, request id): a key that reuses another key's request id records its own answer
and feedback beside the other's, never over them.

Expiry (:meth:`ConversationStore.purge`) runs at start and then every ``purge_interval_s`` in a
thread of its own with its own connection (:meth:`ConversationStore.start_purging`), in small
batches over indexed columns; requests never purge. Until it runs, a conversation past its
retention is already left out of what the requests read.

An owner is an API key id, or :data:`ANONYMOUS` for the requests of a service with auth off. Every
read and write names its owner: one key never sees or changes another's conversations.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from deployments.auth import _tx, connect_db, open_db

log = logging.getLogger("ray.serve")

ANONYMOUS = "anonymous"  # the owner (and usage account, deployments.governor) of requests made with auth off
TITLE_MAX = 200
COMMENT_MAX = 2000
PURGE_BATCH = 500  # rows deleted per purge transaction: the write lock is held for milliseconds at a time

_TABLES = """
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
"""
# After _migrate: an index renamed away with an old table would make IF NOT EXISTS skip its new one.
_INDEXES = """
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated);
CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated);
CREATE INDEX IF NOT EXISTS chat_requests_created ON chat_requests (created);
CREATE INDEX IF NOT EXISTS feedback_updated ON feedback (updated);
CREATE INDEX IF NOT EXISTS feedback_conversation ON feedback (conversation_id);
"""
# Tables that were keyed by request id alone before they were keyed by (owner, request id).
_REKEYED = {"chat_requests": "owner, request_id, conversation_id, created",
            "feedback": "owner, request_id, conversation_id, score, comment, created, updated"}

# What purge deletes, one batch per statement (each over an index: tests/test_conversations.py checks the plans).
PURGE_STATEMENTS = {
    "expired conversations": "SELECT id FROM conversations WHERE updated < ? LIMIT ?",
    "their turns": "DELETE FROM turns WHERE conversation_id = ?",
    "their feedback": "DELETE FROM feedback WHERE conversation_id = ?",
    "the conversations": "DELETE FROM conversations WHERE id = ?",
    "expired request ids": "DELETE FROM chat_requests WHERE rowid IN "
                           "(SELECT rowid FROM chat_requests WHERE created < ? LIMIT ?)",
    "expired feedback": "DELETE FROM feedback WHERE rowid IN (SELECT rowid FROM feedback WHERE updated < ? LIMIT ?)",
}


class ConversationLimitError(ValueError):
    """The owner already has ``max_conversations``; the message says how many and what to do."""

    code = "conversation_limit_reached"


def _migrate(conn: sqlite3.Connection) -> None:
    """Re-key the tables of :data:`_REKEYED` that an older database keys by request id alone
    (rows kept), under the write lock and checked again there."""

    def old() -> list[str]:
        return [t for t in _REKEYED if [r[1] for r in sorted(conn.execute(f"PRAGMA table_info({t})"),
                                                             key=lambda r: r[5]) if r[5]] == ["request_id"]]

    if not old():
        return
    with _tx(conn):
        for table in old():
            cols = _REKEYED[table]
            conn.execute(f"ALTER TABLE {table} RENAME TO {table}_unkeyed")
            create = _TABLES.split(f"CREATE TABLE IF NOT EXISTS {table} (", 1)[1].split(");", 1)[0]
            conn.execute(f"CREATE TABLE {table} ({create})")
            conn.execute(f"INSERT OR IGNORE INTO {table} ({cols}) SELECT {cols} FROM {table}_unkeyed")
            conn.execute(f"DROP TABLE {table}_unkeyed")


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(12)


class ConversationStore:
    """The tables above, over one connection with a lock (usable from several threads); the purge
    thread, once started, has a connection of its own."""

    def __init__(self, path: str | Path, *, retention_days: float | None = 30, max_turns: int = 200,
                 max_conversations: int | None = 1000, feedback_retention_days: float | None = 90) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400 if retention_days else None
        self.feedback_retention_s = feedback_retention_days * 86400 if feedback_retention_days else None
        self.max_turns = max_turns
        self.max_conversations = max_conversations
        self._conn = open_db(self.path)
        self._conn.executescript(_TABLES)
        _migrate(self._conn)
        self._conn.executescript(_INDEXES)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None
        self.purge()

    # -----------------------------------------------------------------------------------------
    # expiry

    def _cutoff(self, now: float | None = None) -> float:
        """Conversations updated before this are past their retention (0: none is)."""
        return 0.0 if self.retention_s is None else (time.time() if now is None else now) - self.retention_s

    def purge(self, now: float | None = None, *, conn: sqlite3.Connection | None = None,
              batch: int = PURGE_BATCH) -> int:
        """Delete conversations (with their turns and feedback) and request ids older than the retention, and
        feedback older than its own; returns how many conversations went. In transactions of at
        most ``batch`` rows each; on ``conn`` (the purge thread's) when given, else on the store's."""
        now = time.time() if now is None else now
        cutoff = self._cutoff(now) if self.retention_s is not None else None
        fb_cutoff = now - self.feedback_retention_s if self.feedback_retention_s is not None else None
        if cutoff is None and fb_cutoff is None:
            return 0
        q = PURGE_STATEMENTS
        lock = nullcontext() if conn is not None else self._lock
        conn = conn or self._conn
        gone = 0
        while True:
            with lock, _tx(conn) as c:
                ids, requests, notes = [], 0, 0
                if cutoff is not None:
                    ids = [(r[0],) for r in c.execute(q["expired conversations"], (cutoff, batch))]
                    c.executemany(q["their turns"], ids)
                    c.executemany(q["their feedback"], ids)  # feedback goes with its conversation
                    c.executemany(q["the conversations"], ids)
                    requests = c.execute(q["expired request ids"], (cutoff, batch)).rowcount
                if fb_cutoff is not None:
                    notes = c.execute(q["expired feedback"], (fb_cutoff, batch)).rowcount
            gone += len(ids)
            if max(len(ids), requests, notes) < batch:
                return gone

    def start_purging(self, every_s: float) -> None:
        """Run :meth:`purge` every ``every_s`` seconds in a daemon thread with its own connection,
        until :meth:`close`. A failed purge is logged and tried again next time."""
        if self._purger is not None or (self.retention_s is None and self.feedback_retention_s is None):
            return

        def run() -> None:
            conn = connect_db(self.path)
            try:
                while not self._stop.wait(every_s):
                    try:
                        self.purge(conn=conn)
                    except Exception as e:  # a locked or full disk: the next round tries again
                        log.error(f"{self.path}: purging expired conversations failed: {e}")
            finally:
                conn.close()

        self._purger = threading.Thread(target=run, name="conversations-purge", daemon=True)
        self._purger.start()

    # -----------------------------------------------------------------------------------------
    # conversations

    def create(self, owner: str, title: str | None = None) -> dict[str, Any]:
        """A new empty conversation; :class:`ConversationLimitError` when the owner has
        ``max_conversations`` already."""
        now = time.time()
        conv = {"id": new_conversation_id(), "object": "conversation", "title": (title or "").strip()[:TITLE_MAX],
                "created": now, "updated": now, "turns": 0}
        with self._lock, _tx(self._conn) as c:
            if self.max_conversations is not None:
                n = c.execute("SELECT COUNT(*) FROM conversations WHERE owner = ? AND updated >= ?",
                              (owner, self._cutoff(now))).fetchone()[0]
                if n >= self.max_conversations:
                    raise ConversationLimitError(
                        f"this API key has {n} conversations, the most governor.conversations.max_conversations "
                        f"({self.max_conversations}) allows; delete one (DELETE /v1/conversations/{{id}}) to start "
                        "another")
            c.execute("INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                      (conv["id"], owner, conv["title"], now, now))
        return conv

    def list(self, owner: str, limit: int = 50) -> list[dict[str, Any]]:
        """The owner's conversations, the most recently updated first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.id, c.title, c.created, c.updated, (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) "
                "FROM conversations c WHERE owner = ? AND updated >= ? ORDER BY updated DESC, rowid DESC LIMIT ?",
                (owner, self._cutoff(), limit)).fetchall()
        return [{"id": r[0], "object": "conversation", "title": r[1], "created": r[2], "updated": r[3], "turns": r[4]}
                for r in rows]

    def exists(self, owner: str, conversation_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ? AND updated >= ?",
                                      (conversation_id, owner, self._cutoff())).fetchone() is not None

    def get(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with its turns (oldest first), or None when the owner has no such one."""
        with self._lock:
            row = self._conn.execute("SELECT id, title, created, updated FROM conversations "
                                     "WHERE id = ? AND owner = ? AND updated >= ?",
                                     (conversation_id, owner, self._cutoff())).fetchone()
            if row is None:
                return None
            turns = self._conn.execute(
                "SELECT t.request_id, t.question, t.answer, t.rag, t.created, f.score, f.comment FROM turns t "
                "LEFT JOIN feedback f ON f.request_id = t.request_id AND f.owner = ? "
                "WHERE t.conversation_id = ? ORDER BY t.seq", (owner, conversation_id)).fetchall()
        return {"id": row[0], "object": "conversation", "title": row[1], "created": row[2], "updated": row[3],
                "turns": [{"request_id": t[0], "question": t[1], "answer": t[2], "rag": json.loads(t[3]),
                           "created": t[4], "feedback": None if t[5] is None else {"score": t[5], "comment": t[6]}}
                          for t in turns]}

    def delete(self, owner: str, conversation_id: str) -> bool:
        """Delete the owner's conversation with its turns and the feedback given on them."""
        with self._lock, _tx(self._conn) as c:
            n = c.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)).rowcount
            if n:
                c.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,))
                c.execute("DELETE FROM feedback WHERE conversation_id = ? AND owner = ?", (conversation_id, owner))
        return bool(n)

    # -----------------------------------------------------------------------------------------
    # answered chats

    def chat_done(self, owner: str, request_id: str, conversation_id: str | None = None,
                  turn: dict[str, Any] | None = None) -> bool:
        """Record that ``request_id`` was answered for ``owner`` and, with ``conversation_id``, append
        ``turn`` (``question``, ``answer``, ``rag``) to it. False when the conversation is not the
        owner's (deleted meanwhile): the request id is still recorded, without it. Idempotent: the
        ingress retries governor calls, and a second call with the same request id changes nothing."""
        now = time.time()
        with self._lock, _tx(self._conn) as c:
            seen = c.execute("SELECT conversation_id FROM chat_requests WHERE request_id = ? AND owner = ?",
                             (request_id, owner)).fetchone()
            if seen is not None:  # a retried call (the governor's reply was lost): recorded once
                return seen[0] is not None
            appended = False
            if conversation_id is not None and turn is not None:
                row = c.execute("SELECT title, (SELECT COALESCE(MAX(seq), 0) FROM turns WHERE conversation_id = ?) "
                                "FROM conversations WHERE id = ? AND owner = ? AND updated >= ?",
                                (conversation_id, conversation_id, owner, self._cutoff(now))).fetchone()
                if row is not None:
                    title, seq = row
                    c.execute("INSERT INTO turns (conversation_id, seq, request_id, question, answer, rag, created) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (conversation_id, seq + 1, request_id, turn.get("question", ""), turn.get("answer", ""),
                               json.dumps(turn.get("rag") or {}), now))
                    if seq + 1 > self.max_turns:  # the oldest turns go first
                        c.execute("DELETE FROM turns WHERE conversation_id = ? AND seq <= ?",
                                  (conversation_id, seq + 1 - self.max_turns))
                    title = title or " ".join(str(turn.get("question", "")).split())[:80]
                    c.execute("UPDATE conversations SET updated = ?, title = ? WHERE id = ?", (now, title, conversation_id))
                    appended = True
            c.execute("INSERT INTO chat_requests (owner, request_id, conversation_id, created) VALUES (?, ?, ?, ?)",
                      (owner, request_id, conversation_id if appended else None, now))
        return appended

    # -----------------------------------------------------------------------------------------
    # feedback

    def put_feedback(self, owner: str, request_id: str, score: int, comment: str | None = None) -> dict[str, Any] | None:
        """Store (or replace) the owner's feedback on one of their answered requests; None when the
        owner has no answered request with that id."""
        if score not in (1, -1):
            raise ValueError(f"score must be 1 or -1, got {score!r}")
        comment = (comment or "").strip()[:COMMENT_MAX] or None
        now = time.time()
        with self._lock, _tx(self._conn) as c:
            row = c.execute("SELECT conversation_id FROM chat_requests WHERE request_id = ? AND owner = ?",
                            (request_id, owner)).fetchone()
            if row is None:
                return None
            c.execute("INSERT INTO feedback (request_id, owner, conversation_id, score, comment, created, updated) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, request_id) DO UPDATE SET score = excluded.score, "
                      "comment = excluded.comment, updated = excluded.updated",
                      (request_id, owner, row[0], score, comment, now, now))
        return {"object": "feedback", "request_id": request_id, "score": score, "comment": comment,
                "conversation_id": row[0], "updated": now}

    def feedback(self, limit: int = 1000, after: float | None = None) -> list[dict[str, Any]]:
        """Every key's feedback, oldest update first, from ``after`` (an ``updated`` time) on: the export."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT request_id, owner, conversation_id, score, comment, created, updated FROM feedback "
                "WHERE updated > ? ORDER BY updated, rowid LIMIT ?", (after or 0.0, limit)).fetchall()
        return [{"request_id": r[0], "key_id": r[1], "conversation_id": r[2], "score": r[3], "comment": r[4],
                 "created": r[5], "updated": r[6]} for r in rows]

    def close(self) -> None:
        self._stop.set()
        if self._purger is not None:
            self._purger.join(timeout=10)
        with self._lock:
            self._conn.close()
