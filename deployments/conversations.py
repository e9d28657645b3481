"""Conversations, the chat requests that were answered, and feedback on them: per API key, in the
governor's SQLite file (the same file as the keys and the usage ledger, tables of their own).

* ``conversations`` and ``turns``: what the chat page lists and reopens. A turn is one question,
  its answer and a summary of its ``rag`` block (sources, status, timings), appended when a chat
  that named ``rag.conversation_id`` ends. A conversation not updated for ``retention_days`` is
  deleted with its turns (checked when conversations are listed or created, and at start).
* ``chat_requests``: the request id of every answered chat and the key that asked, so that
  feedback on an unknown (or someone else's) request id is refused. Kept as long as conversations.
* ``feedback``: one row per request id (sending again replaces the score and comment), kept until
  deleted by hand: it is what an operator exports (``GET /v1/feedback``).

An owner is an API key id, or :data:`ANONYMOUS` for the requests of a service with auth off. Every
read and write names its owner: one key never sees or changes another's conversations.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from deployments.auth import _tx, open_db

ANONYMOUS = "anonymous"  # the owner (and usage account, deployments.governor) of requests made with auth off
TITLE_MAX = 200
COMMENT_MAX = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    title TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated);
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
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    conversation_id TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    conversation_id TEXT,
    score INTEGER NOT NULL,
    comment TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(12)


class ConversationStore:
    """The tables above, over one connection with a lock (usable from several threads)."""

    def __init__(self, path: str | Path, *, retention_days: float | None = 30, max_turns: int = 200) -> None:
        self.path = Path(path)
        self.retention_s = retention_days * 86400 if retention_days else None
        self.max_turns = max_turns
        self._conn = open_db(self.path)
        self._conn.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self.purge()

    # -----------------------------------------------------------------------------------------
    # conversations

    def purge(self, now: float | None = None) -> int:
        """Delete conversations (with their turns) and request ids older than the retention; returns
        how many conversations went."""
        if self.retention_s is None:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_s
        with self._lock, _tx(self._conn) as c:
            c.execute("DELETE FROM turns WHERE conversation_id IN (SELECT id FROM conversations WHERE updated < ?)",
                      (cutoff,))
            n = c.execute("DELETE FROM conversations WHERE updated < ?", (cutoff,)).rowcount
            c.execute("DELETE FROM chat_requests WHERE created < ?", (cutoff,))
        return n

    def create(self, owner: str, title: str | None = None) -> dict[str, Any]:
        self.purge()
        now = time.time()
        conv = {"id": new_conversation_id(), "object": "conversation", "title": (title or "").strip()[:TITLE_MAX],
                "created": now, "updated": now, "turns": 0}
        with self._lock, _tx(self._conn) as c:
            c.execute("INSERT INTO conversations (id, owner, title, created, updated) VALUES (?, ?, ?, ?, ?)",
                      (conv["id"], owner, conv["title"], now, now))
        return conv

    def list(self, owner: str, limit: int = 50) -> list[dict[str, Any]]:
        """The owner's conversations, the most recently updated first."""
        self.purge()
        with self._lock:
            rows = self._conn.execute(
                "SELECT c.id, c.title, c.created, c.updated, (SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) "
                "FROM conversations c WHERE owner = ? ORDER BY updated DESC, rowid DESC LIMIT ?", (owner, limit)
            ).fetchall()
        return [{"id": r[0], "object": "conversation", "title": r[1], "created": r[2], "updated": r[3], "turns": r[4]}
                for r in rows]

    def exists(self, owner: str, conversation_id: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?",
                                      (conversation_id, owner)).fetchone() is not None

    def get(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with its turns (oldest first), or None when the owner has no such one."""
        with self._lock:
            row = self._conn.execute("SELECT id, title, created, updated FROM conversations WHERE id = ? AND owner = ?",
                                     (conversation_id, owner)).fetchone()
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
        with self._lock, _tx(self._conn) as c:
            n = c.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (conversation_id, owner)).rowcount
            if n:
                c.execute("DELETE FROM turns WHERE conversation_id = ?", (conversation_id,))
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
                                "FROM conversations WHERE id = ? AND owner = ?",
                                (conversation_id, conversation_id, owner)).fetchone()
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
            c.execute("INSERT OR REPLACE INTO chat_requests (request_id, owner, conversation_id, created) "
                      "VALUES (?, ?, ?, ?)", (request_id, owner, conversation_id if appended else None, now))
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
                      "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET score = excluded.score, "
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
        with self._lock:
            self._conn.close()
