"""Conversations, the chat requests that were answered, and feedback on them, per API key, in the
state database (tables ``conversations``, ``turns``, ``chat_requests``, ``feedback``).

* ``conversations`` and ``turns``: what the chat page lists and reopens. A turn is one question,
  its answer and a summary of its ``rag`` block, appended when a chat that named
  ``rag.conversation_id`` ends. An owner has at most ``max_conversations``
  (:class:`ConversationLimitError` past it: nothing is deleted for them) of at most ``max_turns``
  turns each (the oldest turns go first).
* ``chat_requests``: the request id of every answered chat and the key that asked, so that
  feedback on an unknown (or someone else's) request id is refused. Kept as long as conversations.
* ``feedback``: one row per owner and request id (sending again replaces it): what an operator
  exports (``GET /v1/feedback``). Deleted with its conversation, and ``feedback_retention_days``
  after its last update.

Request ids are chosen by the client, so answered requests and feedback are keyed by (owner,
request id): a key that reuses another key's request id records its own answer beside the other's.

Two ports, :class:`Conversations` and :class:`Feedback`, one SQL implementation
(:class:`SqlConversations`). Several ingress processes share the tables: on PostgreSQL a create
takes a per-owner transaction lock before counting (the limit holds across replicas) and an append
locks its conversation's row (turn numbers never collide); SQLite's write lock serializes both.
Expiry (:meth:`SqlConversations.purge`) runs on a timer in a thread of its own, in small batches
over indexed columns; requests never purge, and read nothing past its retention.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import Any, Protocol

from sqlalchemy import Connection, text

from state.db import Database

log = logging.getLogger("ray.serve")

ANONYMOUS = "anonymous"  # the owner (and usage account) of requests made with auth off
TITLE_MAX = 200
COMMENT_MAX = 2000
PURGE_BATCH = 500  # rows deleted per purge transaction: the write lock is held for milliseconds at a time

# What purge deletes, one batch per statement, each over an index (tests/test_state_conversations.py checks the plans).
PURGE_STATEMENTS = {
    "expired conversations": "SELECT id FROM conversations WHERE updated < :cutoff ORDER BY updated LIMIT :batch",
    "their turns": "DELETE FROM turns WHERE conversation_id = :id",
    "their feedback": "DELETE FROM feedback WHERE conversation_id = :id",
    "the conversations": "DELETE FROM conversations WHERE id = :id",
    "expired request ids": "DELETE FROM chat_requests WHERE (owner, request_id) IN "
                           "(SELECT owner, request_id FROM chat_requests WHERE created < :cutoff LIMIT :batch)",
    "expired feedback": "DELETE FROM feedback WHERE (owner, request_id) IN "
                        "(SELECT owner, request_id FROM feedback WHERE updated < :cutoff LIMIT :batch)",
}


# The same statements as run on PostgreSQL, where another process may write meanwhile: the rows a batch
# deletes are locked when chosen (FOR UPDATE) and chosen again if they changed, so a conversation
# appended to (or feedback sent again) while the purge runs is kept. SQLite's write lock serializes.
PG_PURGE_STATEMENTS = {
    **PURGE_STATEMENTS,
    "expired conversations": PURGE_STATEMENTS["expired conversations"] + " FOR UPDATE",
    "expired feedback": "DELETE FROM feedback WHERE (owner, request_id) IN "
                        "(SELECT owner, request_id FROM feedback WHERE updated < :cutoff LIMIT :batch FOR UPDATE)",
}
CREATE_LOCK = 727102  # the first key of create()'s pg_advisory_xact_lock(CREATE_LOCK, hashtext(owner))


class ConversationLimitError(ValueError):
    """The owner already has ``max_conversations``; the message says how many and what to do."""

    code = "conversation_limit_reached"


def new_conversation_id() -> str:
    return "conv_" + secrets.token_hex(12)


class Conversations(Protocol):
    def create(self, owner: str, title: str | None = None) -> dict[str, Any]: ...
    def list(self, owner: str, limit: int = 50) -> list[dict[str, Any]]: ...
    def exists(self, owner: str, conversation_id: str) -> bool: ...
    def get(self, owner: str, conversation_id: str) -> dict[str, Any] | None: ...
    def delete(self, owner: str, conversation_id: str) -> bool: ...
    def chat_done(self, owner: str, request_id: str, conversation_id: str | None = None,
                  turn: dict[str, Any] | None = None) -> bool: ...


class Feedback(Protocol):
    def put_feedback(self, owner: str, request_id: str, score: int,
                     comment: str | None = None) -> dict[str, Any] | None: ...
    def feedback(self, limit: int = 1000, after: float | None = None) -> list[dict[str, Any]]: ...


class SqlConversations:
    """:class:`Conversations` and :class:`Feedback` over the state database."""

    def __init__(self, db: Database, *, retention_days: float | None = 30, max_turns: int = 200,
                 max_conversations: int | None = 1000, feedback_retention_days: float | None = 90) -> None:
        self.db = db
        self.retention_s = retention_days * 86400 if retention_days else None
        self.feedback_retention_s = feedback_retention_days * 86400 if feedback_retention_days else None
        self.max_turns = max_turns
        self.max_conversations = max_conversations
        self._stop = threading.Event()
        self._purger: threading.Thread | None = None

    def _pg(self) -> bool:
        return self.db.dialect == "postgresql"

    # -- expiry -----------------------------------------------------------------------------------

    def _cutoff(self, now: float | None = None) -> float:
        """Conversations updated before this are past their retention (0: none is)."""
        return 0.0 if self.retention_s is None else (time.time() if now is None else now) - self.retention_s

    def purge(self, now: float | None = None, *, batch: int = PURGE_BATCH) -> int:
        """Delete conversations (with their turns and feedback) and request ids older than the
        retention, and feedback older than its own; returns how many conversations went. In
        transactions of at most ``batch`` rows each."""
        now = time.time() if now is None else now
        cutoff = self._cutoff(now) if self.retention_s is not None else None
        fb_cutoff = now - self.feedback_retention_s if self.feedback_retention_s is not None else None
        if cutoff is None and fb_cutoff is None:
            return 0
        q = {k: text(v) for k, v in (PG_PURGE_STATEMENTS if self._pg() else PURGE_STATEMENTS).items()}
        gone = 0
        while True:
            with self.db.tx() as c:
                ids, requests, notes = [], 0, 0
                if cutoff is not None:
                    ids = [{"id": r[0]} for r in c.execute(q["expired conversations"], {"cutoff": cutoff, "batch": batch})]
                    if ids:
                        c.execute(q["their turns"], ids)
                        c.execute(q["their feedback"], ids)  # feedback goes with its conversation
                        c.execute(q["the conversations"], ids)
                    requests = c.execute(q["expired request ids"], {"cutoff": cutoff, "batch": batch}).rowcount
                if fb_cutoff is not None:
                    notes = c.execute(q["expired feedback"], {"cutoff": fb_cutoff, "batch": batch}).rowcount
            gone += len(ids)
            if max(len(ids), requests, notes) < batch:
                return gone

    def start_purging(self, every_s: float) -> None:
        """Run :meth:`purge` at once and then every ``every_s`` seconds in a daemon thread, until
        :meth:`stop_purging`. A failed purge is logged and tried again next time."""
        if self._purger is not None or (self.retention_s is None and self.feedback_retention_s is None):
            return
        self._stop.clear()

        def run() -> None:
            while True:
                try:
                    self.purge()
                except Exception as e:  # a database that is down or locked: the next round tries again
                    log.error(f"purging expired conversations failed: {type(e).__name__}: {e}")
                if self._stop.wait(every_s):
                    return

        self._purger = threading.Thread(target=run, name="conversations-purge", daemon=True)
        self._purger.start()

    def stop_purging(self) -> None:
        self._stop.set()
        if self._purger is not None:
            self._purger.join(timeout=10)
            self._purger = None

    close = stop_purging

    # -- conversations ----------------------------------------------------------------------------

    def create(self, owner: str, title: str | None = None) -> dict[str, Any]:
        """A new empty conversation; :class:`ConversationLimitError` when the owner has
        ``max_conversations`` already."""
        now = time.time()
        conv = {"id": new_conversation_id(), "object": "conversation", "title": (title or "").strip()[:TITLE_MAX],
                "created": now, "updated": now, "turns": 0}
        with self.db.tx() as c:
            if self.max_conversations is not None:
                if self._pg():  # replicas creating for one owner at once count one after the other
                    c.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:o))"), {"k": CREATE_LOCK, "o": owner})
                n = c.execute(text("SELECT COUNT(*) FROM conversations WHERE owner = :o AND updated >= :cut"),
                              {"o": owner, "cut": self._cutoff(now)}).scalar()
                if n >= self.max_conversations:
                    raise ConversationLimitError(
                        f"this API key has {n} conversations, the most governor.conversations.max_conversations "
                        f"({self.max_conversations}) allows; delete one (DELETE /v1/conversations/{{id}}) to start "
                        "another")
            c.execute(text("INSERT INTO conversations (id, owner, title, created, updated) "
                           "VALUES (:id, :o, :t, :now, :now)"), {"id": conv["id"], "o": owner, "t": conv["title"], "now": now})
        return conv

    def list(self, owner: str, limit: int = 50) -> list[dict[str, Any]]:
        """The owner's conversations, the most recently updated first."""
        with self.db.read() as c:
            rows = c.execute(text(
                "SELECT c.id, c.title, c.created, c.updated, "
                "(SELECT COUNT(*) FROM turns t WHERE t.conversation_id = c.id) "
                "FROM conversations c WHERE owner = :o AND updated >= :cut ORDER BY updated DESC, created DESC, id "
                "LIMIT :n"), {"o": owner, "cut": self._cutoff(), "n": limit}).all()
        return [{"id": r[0], "object": "conversation", "title": r[1], "created": r[2], "updated": r[3], "turns": r[4]}
                for r in rows]

    def exists(self, owner: str, conversation_id: str) -> bool:
        with self.db.read() as c:
            return c.execute(text("SELECT 1 FROM conversations WHERE id = :id AND owner = :o AND updated >= :cut"),
                             {"id": conversation_id, "o": owner, "cut": self._cutoff()}).first() is not None

    def get(self, owner: str, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with its turns (oldest first), or None when the owner has no such one."""
        with self.db.read() as c:
            row = c.execute(text("SELECT id, title, created, updated FROM conversations "
                                 "WHERE id = :id AND owner = :o AND updated >= :cut"),
                            {"id": conversation_id, "o": owner, "cut": self._cutoff()}).first()
            if row is None:
                return None
            turns = c.execute(text(
                "SELECT t.request_id, t.question, t.answer, t.rag, t.created, f.score, f.comment FROM turns t "
                "LEFT JOIN feedback f ON f.request_id = t.request_id AND f.owner = :o "
                "WHERE t.conversation_id = :id ORDER BY t.seq"), {"o": owner, "id": conversation_id}).all()
        return {"id": row[0], "object": "conversation", "title": row[1], "created": row[2], "updated": row[3],
                "turns": [{"request_id": t[0], "question": t[1], "answer": t[2], "rag": json.loads(t[3]),
                           "created": t[4], "feedback": None if t[5] is None else {"score": t[5], "comment": t[6]}}
                          for t in turns]}

    def delete(self, owner: str, conversation_id: str) -> bool:
        """Delete the owner's conversation with its turns and the feedback given on them."""
        with self.db.tx() as c:
            n = c.execute(text("DELETE FROM conversations WHERE id = :id AND owner = :o"),
                          {"id": conversation_id, "o": owner}).rowcount
            if n:
                c.execute(text("DELETE FROM turns WHERE conversation_id = :id"), {"id": conversation_id})
                c.execute(text("DELETE FROM feedback WHERE conversation_id = :id AND owner = :o"),
                          {"id": conversation_id, "o": owner})
        return bool(n)

    # -- answered chats ---------------------------------------------------------------------------

    def chat_done(self, owner: str, request_id: str, conversation_id: str | None = None,
                  turn: dict[str, Any] | None = None) -> bool:
        """Record that ``request_id`` was answered for ``owner`` and, with ``conversation_id``, append
        ``turn`` (``question``, ``answer``, ``rag``) to it. False when the conversation is not the
        owner's (deleted meanwhile): the request id is still recorded, without it. Idempotent: the
        ingress retries state calls, and a second call with the same request id changes nothing."""
        now = time.time()
        with self.db.tx() as c:
            # The request id first: a retry that runs beside the first call (another replica) waits
            # here for it to commit, then finds its record and appends nothing.
            claimed = c.execute(text(
                "INSERT INTO chat_requests (owner, request_id, conversation_id, created) VALUES (:o, :r, NULL, :now) "
                "ON CONFLICT (owner, request_id) DO NOTHING"), {"o": owner, "r": request_id, "now": now}).rowcount
            if not claimed:  # a retried call (its reply was lost): recorded once
                seen = c.execute(text("SELECT conversation_id FROM chat_requests WHERE owner = :o AND request_id = :r"),
                                 {"o": owner, "r": request_id}).first()
                return seen is not None and seen[0] is not None
            if conversation_id is None or turn is None:
                return False
            if not self._append(c, owner, request_id, conversation_id, turn, now):
                return False
            c.execute(text("UPDATE chat_requests SET conversation_id = :cid WHERE owner = :o AND request_id = :r"),
                      {"cid": conversation_id, "o": owner, "r": request_id})
        return True

    def _append(self, c: Connection, owner: str, request_id: str, conversation_id: str, turn: dict[str, Any],
                now: float) -> bool:
        lock = " FOR UPDATE" if self._pg() else ""  # one append at a time per conversation
        row = c.execute(text("SELECT title FROM conversations WHERE id = :id AND owner = :o AND updated >= :cut" + lock),
                        {"id": conversation_id, "o": owner, "cut": self._cutoff(now)}).first()
        if row is None:
            return False
        seq = c.execute(text("SELECT COALESCE(MAX(seq), 0) FROM turns WHERE conversation_id = :id"),
                        {"id": conversation_id}).scalar()
        c.execute(text("INSERT INTO turns (conversation_id, seq, request_id, question, answer, rag, created) "
                       "VALUES (:id, :seq, :r, :q, :a, :rag, :now)"),
                  {"id": conversation_id, "seq": seq + 1, "r": request_id, "q": turn.get("question", ""),
                   "a": turn.get("answer", ""), "rag": json.dumps(turn.get("rag") or {}), "now": now})
        if seq + 1 > self.max_turns:  # the oldest turns go first
            c.execute(text("DELETE FROM turns WHERE conversation_id = :id AND seq <= :s"),
                      {"id": conversation_id, "s": seq + 1 - self.max_turns})
        title = row[0] or " ".join(str(turn.get("question", "")).split())[:80]
        c.execute(text("UPDATE conversations SET updated = :now, title = :t WHERE id = :id"),
                  {"now": now, "t": title, "id": conversation_id})
        return True

    # -- feedback ---------------------------------------------------------------------------------

    def put_feedback(self, owner: str, request_id: str, score: int, comment: str | None = None) -> dict[str, Any] | None:
        """Store (or replace) the owner's feedback on one of their answered requests; None when the
        owner has no answered request with that id."""
        if score not in (1, -1):
            raise ValueError(f"score must be 1 or -1, got {score!r}")
        comment = (comment or "").strip()[:COMMENT_MAX] or None
        now = time.time()
        with self.db.tx() as c:
            row = c.execute(text("SELECT conversation_id FROM chat_requests WHERE request_id = :r AND owner = :o"),
                            {"r": request_id, "o": owner}).first()
            if row is None:
                return None
            c.execute(text(
                "INSERT INTO feedback (request_id, owner, conversation_id, score, comment, created, updated) "
                "VALUES (:r, :o, :cid, :s, :cm, :now, :now) ON CONFLICT (owner, request_id) DO UPDATE SET "
                "score = excluded.score, comment = excluded.comment, updated = excluded.updated"),
                {"r": request_id, "o": owner, "cid": row[0], "s": score, "cm": comment, "now": now})
        return {"object": "feedback", "request_id": request_id, "score": score, "comment": comment,
                "conversation_id": row[0], "updated": now}

    def feedback(self, limit: int = 1000, after: float | None = None) -> list[dict[str, Any]]:
        """Every key's feedback, oldest update first, from ``after`` (an ``updated`` time) on: the export."""
        with self.db.read() as c:
            rows = c.execute(text(
                "SELECT request_id, owner, conversation_id, score, comment, created, updated FROM feedback "
                "WHERE updated > :after ORDER BY updated, owner, request_id LIMIT :n"),
                {"after": after or 0.0, "n": limit}).all()
        return [{"request_id": r[0], "key_id": r[1], "conversation_id": r[2], "score": r[3], "comment": r[4],
                 "created": r[5], "updated": r[6]} for r in rows]
