"""The conversation store (state/conversations.py) as several ingress processes use it, each test
on a SQLite file and on a real PostgreSQL server (``state_db``): one :class:`Database` per
"replica" on the same URL, threads writing at once (the conversation limit holds, turn numbers
never collide, a retry beside its first call records once), the purge's statements served by
indexes, and a purge that runs beside writes keeping what they just touched. The store's single-
process behaviour (retention, max_turns, feedback, the purge timer) is tests/test_conversations.py."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import event, text
from state_fixtures import state_db  # noqa: F401  (a fixture)

from state.conversations import (
    PG_PURGE_STATEMENTS,
    PURGE_STATEMENTS,
    ConversationLimitError,
    Conversations,
    Feedback,
    SqlConversations,
)
from state.db import Database

TURN = {"question": "q", "answer": "a", "rag": {}}


@pytest.fixture
def replicas(state_db):  # noqa: F811
    """Four Databases on one URL (four pools, as four ingress processes have), the first ``state_db``."""
    dbs = [state_db] + [Database(state_db.url) for _ in range(3)]
    yield dbs
    for db in dbs[1:]:
        db.close()


def _threads(n: int, work) -> list:
    """``work(i)`` in ``n`` threads started together; their results (an exception fails the test)."""
    results: list = [None] * n
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def test_sql_conversations_implements_both_ports(state_db):  # noqa: F811
    store = SqlConversations(state_db)
    conversations: Conversations = store
    feedback: Feedback = store
    for port in (Conversations, Feedback):
        for name in (n for n in vars(port) if not n.startswith("_")):
            assert callable(getattr(store, name)), name
    assert conversations.list("nobody") == [] and feedback.feedback() == []


def test_owners_see_and_change_only_their_own(state_db):  # noqa: F811
    store = SqlConversations(state_db)
    cid = store.create("alice", "  mine  ")["id"]
    assert store.chat_done("alice", "r1", cid, TURN)
    assert store.list("bob") == [] and store.get("bob", cid) is None and not store.exists("bob", cid)
    assert not store.delete("bob", cid)
    assert not store.chat_done("bob", "r2", cid, TURN)  # bob's request is recorded, without alice's conversation
    assert store.put_feedback("bob", "r1", 1) is None  # alice's answer
    assert store.put_feedback("bob", "r2", -1)["conversation_id"] is None
    got = store.get("alice", cid)
    assert got["title"] == "mine" and [t["request_id"] for t in got["turns"]] == ["r1"]
    assert got["turns"][0]["feedback"] is None  # bob's feedback on his own r2 is not on alice's turn
    assert store.put_feedback("alice", "r1", 1, "x" * 5000)["comment"] == "x" * 2000
    assert store.get("alice", cid)["turns"][0]["feedback"] == {"score": 1, "comment": "x" * 2000}
    with pytest.raises(ValueError, match="score must be 1 or -1"):
        store.put_feedback("alice", "r1", 0)


def test_the_limit_counts_live_conversations_and_deleting_one_makes_room(state_db):  # noqa: F811
    store = SqlConversations(state_db, max_conversations=2, retention_days=1)
    first, second = store.create("k")["id"], store.create("k")["id"]
    with pytest.raises(ConversationLimitError, match=r"2 conversations.*DELETE /v1/conversations") as e:
        store.create("k")
    assert e.value.code == "conversation_limit_reached"
    store.create("other")  # per owner
    assert store.delete("k", first)
    third = store.create("k")["id"]
    state_db.execute("UPDATE conversations SET updated = updated - 2 * 86400 WHERE id = :id", {"id": second})
    fourth = store.create("k")["id"]  # an expired one, not purged yet, does not count
    assert {c["id"] for c in store.list("k")} == {third, fourth}


def test_list_is_most_recently_updated_first_and_feedback_pages_by_update(state_db):  # noqa: F811
    store = SqlConversations(state_db)
    ids = [store.create("k", f"c{i}")["id"] for i in range(3)]
    assert store.chat_done("k", "r0", ids[0], TURN)  # now the most recent
    assert [c["id"] for c in store.list("k")] == [ids[0], ids[2], ids[1]]
    assert [c["turns"] for c in store.list("k")] == [1, 0, 0] and len(store.list("k", limit=2)) == 2
    for i in range(3):
        store.chat_done("k", f"n{i}", None)
        store.put_feedback("k", f"n{i}", 1)
    first = store.feedback(limit=2)
    assert [f["request_id"] for f in first] == ["n0", "n1"]
    assert [f["request_id"] for f in store.feedback(after=first[-1]["updated"])] == ["n2"]


# ---------------------------------------------------------------- several replicas at once


def test_creates_from_8_threads_on_4_replicas_end_with_exactly_the_limit(replicas):
    stores = [SqlConversations(db, max_conversations=10) for db in replicas]

    def work(i: int) -> tuple[int, int]:
        made = refused = 0
        for _ in range(5):
            try:
                stores[i % 4].create("k")
                made += 1
            except ConversationLimitError:
                refused += 1
        return made, refused

    results = _threads(8, work)
    assert sum(m for m, _ in results) == 10 and sum(r for _, r in results) == 30
    assert replicas[0].execute("SELECT COUNT(*) FROM conversations WHERE owner = 'k'")[0][0] == 10


def test_turns_appended_from_8_threads_on_4_replicas_get_consecutive_numbers(replicas):
    stores = [SqlConversations(db, max_turns=1000) for db in replicas]
    cid = stores[0].create("k")["id"]

    def work(i: int) -> list[bool]:
        return [stores[i % 4].chat_done("k", f"r{i}-{j}", cid, {"question": f"q{i}-{j}", "answer": "a", "rag": {}})
                for j in range(5)]

    assert all(all(r) for r in _threads(8, work))
    rows = replicas[0].execute("SELECT seq, request_id, question FROM turns WHERE conversation_id = :c ORDER BY seq",
                               {"c": cid})
    assert [r[0] for r in rows] == list(range(1, 41))
    assert sorted(r[1] for r in rows) == sorted(f"r{i}-{j}" for i in range(8) for j in range(5))
    assert all(r[2] == "q" + r[1][1:] for r in rows)  # each turn is its own request's
    assert stores[1].get("k", cid)["turns"][-1]["request_id"] == rows[-1][1]


def test_a_retry_beside_its_first_call_records_once_and_says_the_same(replicas):
    """The ingress retries a state call whose reply was lost; on another replica both can run at once."""
    stores = [SqlConversations(db) for db in replicas]
    cid = stores[0].create("k")["id"]
    for n in range(10):
        assert _threads(8, lambda i: stores[i % 4].chat_done("k", f"same{n}", cid, TURN)) == [True] * 8
        assert _threads(8, lambda i: stores[i % 4].chat_done("k", f"alone{n}", None)) == [False] * 8
    turns = stores[0].get("k", cid)["turns"]
    assert [t["request_id"] for t in turns] == [f"same{n}" for n in range(10)]
    assert replicas[0].execute("SELECT COUNT(*) FROM chat_requests")[0][0] == 20
    assert all(stores[1].put_feedback("k", f"same{n}", 1)["conversation_id"] == cid for n in range(10))


# ---------------------------------------------------------------- the purge


def _plans(db: Database) -> dict[str, list[str]]:
    """The plan of each statement the purge runs on ``db``'s dialect."""
    args = {"cutoff": 0.0, "batch": 10, "id": "conv_x"}
    statements = PG_PURGE_STATEMENTS if db.dialect == "postgresql" else PURGE_STATEMENTS
    plans = {}
    with db.tx() as c:
        if db.dialect == "postgresql":
            # Whether an index can serve each statement: with sequential scans priced out, a plan
            # still shows one only where no index applies (tiny test tables would scan anyway).
            c.execute(text("SET LOCAL enable_seqscan = off"))
            explain, column = "EXPLAIN ", 0
        else:
            explain, column = "EXPLAIN QUERY PLAN ", 3
        for name, sql in statements.items():
            params = {k: v for k, v in args.items() if f":{k}" in sql}
            plans[name] = [str(row[column]) for row in c.execute(text(explain + sql), params)]
        c.rollback()
    return plans


def test_every_purge_statement_is_served_by_an_index(state_db):  # noqa: F811
    plans = _plans(state_db)
    assert set(plans) == set(PURGE_STATEMENTS) == set(PG_PURGE_STATEMENTS)
    if state_db.dialect == "postgresql":
        scans = {n: p for n, p in plans.items() if any("Seq Scan" in line for line in p)}
        assert all(any("Index" in line for line in p) for p in plans.values()), plans
    else:
        scans = {n: p for n, p in plans.items() if any(d.startswith("SCAN") and "INDEX" not in d for d in p)}
    assert not scans, scans


def test_the_purge_goes_in_batches_and_runs_the_statements_it_names(state_db):  # noqa: F811
    store = SqlConversations(state_db, retention_days=1, feedback_retention_days=1)
    for i in range(5):
        cid = store.create("k")["id"]
        store.chat_done("k", f"r{i}", cid, TURN)
        store.put_feedback("k", f"r{i}", 1)
        store.chat_done("k", f"bare{i}", None)
        store.put_feedback("k", f"bare{i}", -1)
    kept = store.create("k")["id"]
    for table, col in (("conversations", "updated"), ("chat_requests", "created"), ("feedback", "updated")):
        state_db.execute(f"UPDATE {table} SET {col} = {col} - 2 * 86400 WHERE {col} > 0")
    state_db.execute("UPDATE conversations SET updated = :now WHERE id = :id", {"now": time.time(), "id": kept})
    ran: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        ran.append(" ".join(statement.split()))

    event.listen(state_db.engine, "before_cursor_execute", seen)
    try:
        assert store.purge(batch=2) == 5
    finally:
        event.remove(state_db.engine, "before_cursor_execute", seen)
    select = "SELECT id FROM conversations WHERE updated <"
    # 2 rows of each kind per transaction: 10 request ids and 10 feedback rows take 5 full batches
    # and a sixth that finds fewer than 2 (none) and ends the purge
    assert sum(s.startswith(select) for s in ran) == 6
    if state_db.dialect == "postgresql":
        assert all(s.endswith("FOR UPDATE") for s in ran if s.startswith(select))
    for table in ("turns", "chat_requests", "feedback"):
        assert state_db.execute(f"SELECT COUNT(*) FROM {table}")[0][0] == 0, table
    assert [c["id"] for c in store.list("k")] == [kept]


def _wait_until_blocked(db: Database, timeout: float = 10) -> None:
    """Until a session of ``db`` waits for a row lock (PostgreSQL)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.execute("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND wait_event_type = 'Lock'")[0][0]:
            return
        time.sleep(0.02)
    raise AssertionError("the purge never waited for the row lock")


def test_a_purge_beside_writes_keeps_what_they_just_touched(replicas):
    """PostgreSQL: a conversation appended to, and feedback sent again, while the purge has chosen them
    as expired are kept (the purge locks what it deletes, and chooses again). SQLite serializes."""
    db = replicas[0]
    if db.dialect != "postgresql":
        pytest.skip("SQLite's write lock serializes the purge and the writes")
    store = SqlConversations(db, retention_days=30, feedback_retention_days=90)
    cid = store.create("k")["id"]
    store.chat_done("k", "r1", cid, TURN)
    store.chat_done("k", "r2", None)
    store.put_feedback("k", "r2", -1)
    # one at a time, a purge that expires only that table's rows
    for table, key, value, options in (("conversations", "id", cid, {"feedback_retention_days": None}),
                                       ("feedback", "request_id", "r2", {"retention_days": None})):
        db.execute(f"UPDATE {table} SET updated = updated - 100 * 86400")
        writer = replicas[1].engine.connect()
        tx = writer.begin()
        try:  # another replica's write, not committed yet: the row is locked
            writer.execute(text(f"UPDATE {table} SET updated = :now WHERE {key} = :v"),
                           {"now": time.time(), "v": value})
            purger = threading.Thread(target=SqlConversations(replicas[2], **options).purge)
            purger.start()
            _wait_until_blocked(db)
            tx.commit()
        finally:
            writer.close()
        purger.join(timeout=30)
        assert not purger.is_alive()
    assert [t["request_id"] for t in store.get("k", cid)["turns"]] == ["r1"]
    assert [f["request_id"] for f in store.feedback()] == ["r2"]
