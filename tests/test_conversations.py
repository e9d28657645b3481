"""Conversations, feedback and the chat page over HTTP without an engine: the in-process app
(serve/local.py, the same routes and admission as the Serve ingress) with the real governor on a
temporary SQLite file. Chats here are answered extractively (``generator.answer_mode: extractive``),
so no vLLM is started; the page in a real browser, with the real engine, is tests/test_ui_browser.py."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from flow.metrics import METRICS
from state.conversations import SqlConversations
from state.db import open_database
from state.keys import SqlKeys
from state_fixtures import state_db  # noqa: F401 (a fixture)


def store_on(db, **options) -> SqlConversations:
    return SqlConversations(db, **options)


def make_cfg(local_cfg, built_index, tmp_path, *, auth: bool, **conversations):
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": auth}
    data["governor"]["conversations"].update(conversations)
    data["generator"].update(answer_mode="extractive")  # answers without the engine
    return type(local_cfg).model_validate(data)


@pytest.fixture()
def service(local_cfg, built_index, tmp_path):
    def start(*, auth: bool = False, **conversations):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, auth=auth, **conversations)
        return TestClient(create_app(cfg), base_url="http://localhost", client=("127.0.0.1", 50000)), cfg

    return start


def ask(client, question="When does the tasting room open?", headers=None, **rag) -> dict:
    r = client.post("/v1/chat/completions", headers=headers or {}, json={
        "model": "ragraph", "messages": [{"role": "user", "content": question}], "rag": rag})
    assert r.status_code == 200, r.text
    return r.json()


def error_code(r, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["code"]


def feedback_count(score: str) -> float:
    return METRICS.feedback.labels(score).prom._value.get()


def test_a_chat_with_a_conversation_id_appends_a_turn_that_comes_back(service):
    client, _ = service()
    conv = client.post("/v1/conversations", json={}).json()
    assert conv["id"].startswith("conv_") and conv["turns"] == 0
    answer = ask(client, conversation_id=conv["id"])
    rid = answer["rag"]["metadata"]["request_id"]
    text = answer["choices"][0]["message"]["content"]
    assert "10 am" in text  # the extractive answer quotes the hours passage
    got = client.get(f"/v1/conversations/{conv['id']}").json()
    assert [t["request_id"] for t in got["turns"]] == [rid]
    turn = got["turns"][0]
    assert turn["question"] == "When does the tasting room open?" and turn["answer"] == text
    assert turn["rag"]["sources"] and turn["rag"]["sources"][0]["title"]
    assert turn["rag"]["metadata"]["request_id"] == rid and "timings_ms" in turn["rag"]["metadata"]
    assert got["title"] == "When does the tasting room open?"  # the first question names an untitled one
    listed = client.get("/v1/conversations").json()["data"]
    assert [(c["id"], c["turns"]) for c in listed] == [(conv["id"], 1)]


def test_a_streamed_chat_appends_its_turn_too(service):
    client, _ = service()
    cid = client.post("/v1/conversations", json={"title": "hours"}).json()["id"]
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "ragraph", "stream": True, "rag": {"conversation_id": cid},
            "messages": [{"role": "user", "content": "Is parking free for visitors?"}]}) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert body.rstrip().endswith("data: [DONE]")
    turns = client.get(f"/v1/conversations/{cid}").json()["turns"]
    assert len(turns) == 1 and turns[0]["request_id"] in body and "Parking" in turns[0]["answer"]


def test_an_unknown_conversation_is_404_everywhere(service):
    client, _ = service()
    assert error_code(client.get("/v1/conversations/conv_nope"), 404) == "conversation_not_found"
    assert error_code(client.delete("/v1/conversations/conv_nope"), 404) == "conversation_not_found"
    r = client.post("/v1/chat/completions", json={"model": "ragraph", "rag": {"conversation_id": "conv_nope"},
                                                  "messages": [{"role": "user", "content": "hours?"}]})
    assert error_code(r, 404) == "conversation_not_found" and r.json()["error"]["param"] == "rag.conversation_id"


def test_delete_removes_a_conversation_and_its_turns(service):
    client, _ = service()
    cid = client.post("/v1/conversations", json={}).json()["id"]
    ask(client, conversation_id=cid)
    assert client.delete(f"/v1/conversations/{cid}").json()["deleted"] is True
    assert client.get("/v1/conversations").json()["data"] == []
    assert error_code(client.get(f"/v1/conversations/{cid}"), 404) == "conversation_not_found"


def test_feedback_is_stored_counted_exported_and_refused_for_unknown_ids(service):
    client, _ = service()
    rid = ask(client)["rag"]["metadata"]["request_id"]  # no conversation: the request id is still known
    before = feedback_count("down")
    r = client.post("/v1/feedback", json={"request_id": "not-a-request", "score": 1})
    assert error_code(r, 404) == "request_not_found"
    assert error_code(client.post("/v1/feedback", json={"request_id": rid, "score": 0}), 400) is not None
    r = client.post("/v1/feedback", json={"request_id": rid, "score": -1, "comment": "wrong day"})
    assert r.status_code == 201 and r.json()["score"] == -1
    assert feedback_count("down") == before + 1
    client.post("/v1/feedback", json={"request_id": rid, "score": 1, "comment": "fine after all"})
    rows = client.get("/v1/feedback").json()["data"]  # auth off: the operator on loopback is admin
    assert [(f["request_id"], f["score"], f["comment"], f["key_id"]) for f in rows] == \
        [(rid, 1, "fine after all", "anonymous")]  # sending again replaces
    assert "rag_feedback_total" in client.get("/metrics").text


def test_feedback_export_pages_by_update_time(service):
    client, _ = service()
    rids = [ask(client)["rag"]["metadata"]["request_id"] for _ in range(2)]
    for rid in rids:
        assert client.post("/v1/feedback", json={"request_id": rid, "score": 1}).status_code == 201
    first = client.get("/v1/feedback", params={"limit": 1}).json()
    assert [f["request_id"] for f in first["data"]] == rids[:1] and first["has_more"] is True
    rest = client.get("/v1/feedback", params={"limit": 1, "after": first["data"][0]["updated"]}).json()
    assert [f["request_id"] for f in rest["data"]] == rids[1:] and rest["has_more"] is False  # exactly one left


def test_with_auth_on_only_the_page_loads_without_a_key_and_keys_see_only_their_own(service):
    client, cfg = service(auth=True)
    keys = SqlKeys(open_database(cfg))
    alice, _ = keys.create("alice")
    bob, _ = keys.create("bob")
    admin, _ = keys.create("ops", scope="admin")
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in page.text and "http" not in page.text.split("<body>")[0].replace(
        "http-equiv", "")  # nothing fetched from elsewhere
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert error_code(client.get("/static/..%2Fui.py"), 404) == "not_found"
    for method, path in (("GET", "/v1/conversations"), ("POST", "/v1/conversations"),
                         ("GET", "/v1/conversations/conv_x"), ("POST", "/v1/feedback"), ("GET", "/v1/feedback")):
        assert error_code(client.request(method, path, json={}), 401) == "missing_api_key", (method, path)
    a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    cid = client.post("/v1/conversations", json={}, headers=a).json()["id"]
    rid = ask(client, headers=a, conversation_id=cid)["rag"]["metadata"]["request_id"]
    assert client.get("/v1/conversations", headers=b).json()["data"] == []
    assert error_code(client.get(f"/v1/conversations/{cid}", headers=b), 404) == "conversation_not_found"
    r = client.post("/v1/chat/completions", headers=b, json={
        "model": "ragraph", "messages": [{"role": "user", "content": "hours?"}], "rag": {"conversation_id": cid}})
    assert error_code(r, 404) == "conversation_not_found"
    assert error_code(client.post("/v1/feedback", headers=b, json={"request_id": rid, "score": 1}), 404) == \
        "request_not_found"  # bob cannot rate alice's answer
    assert client.post("/v1/feedback", headers=a, json={"request_id": rid, "score": 1}).status_code == 201
    assert error_code(client.get("/v1/feedback", headers=a), 403) == "insufficient_scope"
    rows = client.get("/v1/feedback", headers={"Authorization": f"Bearer {admin}"}).json()["data"]
    assert [(f["request_id"], f["conversation_id"], f["score"]) for f in rows] == [(rid, cid, 1)]


def test_conversations_past_their_retention_are_deleted(state_db):
    store = store_on(state_db, retention_days=1)
    old = store.create("k1", "old")
    new = store.create("k1", "new")
    store.chat_done("k1", "r-old", old["id"], {"question": "q", "answer": "a", "rag": {}})
    assert store.purge(now=time.time() + 86400 + 60) == 2  # both are older than a day by then
    store.chat_done("k1", "r-new", None)
    assert store.list("k1") == [] and store.get("k1", new["id"]) is None
    assert store.put_feedback("k1", "r-old", 1) is None  # its request id went with it
    assert store.put_feedback("k1", "r-new", 1)["score"] == 1
    kept = store_on(state_db, retention_days=None)
    c = kept.create("k1")
    assert kept.purge(now=time.time() + 10 * 365 * 86400) == 0 and kept.get("k1", c["id"]) is not None


def test_a_conversation_keeps_its_last_max_turns(state_db):
    store = store_on(state_db, max_turns=2)
    cid = store.create("k", None)["id"]
    for i in range(3):
        assert store.chat_done("k", f"r{i}", cid, {"question": f"q{i}", "answer": f"a{i}", "rag": {}})
    assert store.chat_done("k", "r2", cid, {"question": "q2", "answer": "a2", "rag": {}})  # a retry: no new turn
    assert [t["question"] for t in store.get("k", cid)["turns"]] == ["q1", "q2"]
    assert not store.chat_done("other", "r9", cid, {"question": "x", "answer": "y", "rag": {}})  # not theirs
    assert len(store.get("k", cid)["turns"]) == 2


def _age(store: SqlConversations, days: float) -> None:
    """Make everything in ``store`` ``days`` older (as if written then)."""
    for table, columns in (("conversations", ("created", "updated")), ("turns", ("created",)),
                           ("chat_requests", ("created",)), ("feedback", ("created", "updated"))):
        store.db.execute(f"UPDATE {table} SET " + ", ".join(f"{c} = {c} - {days * 86400}" for c in columns))


def _count(store: SqlConversations, table: str) -> int:
    return store.db.execute(f"SELECT COUNT(*) FROM {table}")[0][0]


def _statements(db) -> list[str]:
    from sqlalchemy import event

    ran: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda conn, cur, stmt, *a: ran.append(stmt))
    return ran


def test_requests_never_purge_and_the_purge_reads_only_indexes(state_db):
    store = store_on(state_db, retention_days=1)
    old = store.create("k", "old")
    store.chat_done("k", "r-old", old["id"], {"question": "q", "answer": "a", "rag": {}})
    assert store.put_feedback("k", "r-old", 1, "fine")
    _age(store, 2)
    ran = _statements(state_db)
    new = store.create("k", "new")
    listed = store.list("k")
    assert not [s for s in ran if s.lstrip().upper().startswith("DELETE")], ran  # no purge on the request path
    assert [c["id"] for c in listed] == [new["id"]]  # the expired one is not shown meanwhile
    assert store.get("k", old["id"]) is None and not store.exists("k", old["id"])
    assert not store.chat_done("k", "r-late", old["id"], {"question": "q", "answer": "a", "rag": {}})
    assert _count(store, "conversations") == 2  # still on disk until the purge
    assert store.purge() == 1
    assert _count(store, "turns") == 0 and store.get("k", new["id"]) is not None
    if state_db.dialect == "sqlite":  # the purge's statements each use an index, none scans a table
        from state.conversations import PURGE_STATEMENTS

        args = {"cutoff": 0.0, "batch": 10, "id": "x"}
        with state_db.read() as c:
            plans = {s: [row[3] for row in c.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + s.replace(":cutoff", "?").replace(":batch", "?").replace(":id", "?"),
                tuple(args[k] for k in ("cutoff", "batch", "id") if ":" + k in s))]
                for s in PURGE_STATEMENTS.values()}
        assert not {s: p for s, p in plans.items() if any(d.startswith("SCAN") and "INDEX" not in d for d in p)}, plans


def test_the_purge_runs_on_a_timer_in_its_own_thread(state_db):
    store = store_on(state_db, retention_days=1)
    for i in range(3):
        store.chat_done("k", f"r{i}", store.create("k")["id"], {"question": "q", "answer": "a", "rag": {}})
    _age(store, 2)
    store.start_purging(0.05)
    deadline = time.monotonic() + 10
    while _count(store, "conversations") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _count(store, "conversations") == _count(store, "turns") == _count(store, "chat_requests") == 0
    purger = store._purger
    store.stop_purging()
    assert purger is not None and not purger.is_alive()  # stop_purging stops it


def test_a_key_past_max_conversations_is_refused_with_409(service):
    client, _ = service(max_conversations=2)
    ids = [client.post("/v1/conversations", json={}).json()["id"] for _ in range(2)]
    r = client.post("/v1/conversations", json={"title": "third"})
    assert error_code(r, 409) == "conversation_limit_reached"
    assert "2 conversations" in r.json()["error"]["message"] and "DELETE /v1/conversations" in r.json()["error"]["message"]
    assert client.delete(f"/v1/conversations/{ids[0]}").status_code == 200
    assert client.post("/v1/conversations", json={}).status_code == 201  # room again, nothing else was deleted
    assert ids[1] in [c["id"] for c in client.get("/v1/conversations").json()["data"]]


def test_a_key_reusing_another_keys_request_id_takes_over_nothing(service):
    client, cfg = service(auth=True)
    keys = SqlKeys(open_database(cfg))
    alice, alice_key = keys.create("alice")
    bob, bob_key = keys.create("bob")
    admin, _ = keys.create("ops", scope="admin")
    a, b = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    cid = client.post("/v1/conversations", json={}, headers=a).json()["id"]
    rid = ask(client, headers=a, conversation_id=cid)["rag"]["metadata"]["request_id"]
    assert client.post("/v1/feedback", headers=a, json={"request_id": rid, "score": 1, "comment": "alice's"}).status_code == 201
    assert ask(client, headers={**b, "X-Request-ID": rid})["rag"]["metadata"]["request_id"] == rid  # bob reuses it
    r = client.post("/v1/feedback", headers=b, json={"request_id": rid, "score": -1, "comment": "bob's"})
    assert r.status_code == 201 and r.json()["conversation_id"] is None  # bob's own answer, not alice's turn
    assert client.post("/v1/feedback", headers=a, json={"request_id": rid, "score": 1}).status_code == 201
    turn = client.get(f"/v1/conversations/{cid}", headers=a).json()["turns"][0]
    assert turn["request_id"] == rid and turn["feedback"] == {"score": 1, "comment": None}
    rows = client.get("/v1/feedback", headers={"Authorization": f"Bearer {admin}"}).json()["data"]
    assert sorted((f["key_id"], f["request_id"], f["score"], f["comment"], f["conversation_id"]) for f in rows) == \
        sorted([(alice_key.id, rid, 1, None, cid), (bob_key.id, rid, -1, "bob's", None)])


def test_feedback_goes_with_its_conversation_and_after_its_retention(state_db):
    store = store_on(state_db, retention_days=None, feedback_retention_days=10)
    cid = store.create("k")["id"]
    store.chat_done("k", "r1", cid, {"question": "q", "answer": "a", "rag": {}})
    store.chat_done("k", "r2", None)
    store.chat_done("other", "r1", None)
    for owner, rid in (("k", "r1"), ("k", "r2"), ("other", "r1")):
        assert store.put_feedback(owner, rid, -1, "a comment")
    assert store.delete("k", cid)
    assert sorted((f["key_id"], f["request_id"]) for f in store.feedback()) == [("k", "r2"), ("other", "r1")]
    store.purge(now=time.time() + 9 * 86400)
    assert len(store.feedback()) == 2  # not yet ten days
    store.purge(now=time.time() + 11 * 86400)
    assert store.feedback() == []


def test_feedback_goes_when_its_conversation_expires(state_db):
    """A conversation past its retention takes its feedback with it, before the feedback's own retention."""
    store = store_on(state_db, retention_days=30, feedback_retention_days=90)
    cid = store.create("k")["id"]
    store.chat_done("k", "r1", cid, {"question": "q", "answer": "a", "rag": {}})
    store.chat_done("k", "r2", None)
    assert store.put_feedback("k", "r1", -1, "about a turn") and store.put_feedback("k", "r2", 1)
    store.purge(now=time.time() + 31 * 86400)
    assert [f["request_id"] for f in store.feedback()] == ["r2"]  # r1's conversation went, and its feedback


def test_a_database_keyed_by_request_id_alone_is_rekeyed_with_its_rows(tmp_path):
    """A file from before the tables were keyed by (owner, request id) is brought to the schema by the
    baseline migration, its rows kept."""
    import sqlite3

    from state.db import Database

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE chat_requests (request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, conversation_id TEXT,
                                    created REAL NOT NULL);
        CREATE TABLE feedback (request_id TEXT PRIMARY KEY, owner TEXT NOT NULL, conversation_id TEXT,
                               score INTEGER NOT NULL, comment TEXT, created REAL NOT NULL, updated REAL NOT NULL);
    """)
    now = time.time()
    db.execute("INSERT INTO chat_requests VALUES ('r1', 'a', NULL, ?)", (now,))
    db.execute("INSERT INTO feedback VALUES ('r1', 'a', NULL, 1, 'kept', ?, ?)", (now, now))
    db.commit()
    db.close()
    database = Database(f"sqlite:///{path}")
    database.upgrade()
    store = store_on(database)
    assert [(f["key_id"], f["comment"]) for f in store.feedback()] == [("a", "kept")]
    store.chat_done("b", "r1", None)
    assert store.put_feedback("b", "r1", -1) and store.put_feedback("a", "r1", 1, "still mine")
    assert sorted((f["key_id"], f["score"]) for f in store.feedback()) == [("a", 1), ("b", -1)]
    assert database.upgrade()[0] == database.upgrade()[1]  # upgrading again changes nothing


def test_creates_from_many_threads_hold_the_conversation_limit(state_db):
    from concurrent.futures import ThreadPoolExecutor

    from state.conversations import ConversationLimitError

    store = store_on(state_db, max_conversations=10)

    def make(_):
        try:
            return store.create("k")["id"]
        except ConversationLimitError:
            return None

    with ThreadPoolExecutor(8) as pool:
        made = [m for m in pool.map(make, range(40)) if m]
    assert len(made) == 10 and len(store.list("k", 100)) == 10


def test_turns_appended_from_many_threads_get_distinct_numbers(state_db):
    from concurrent.futures import ThreadPoolExecutor

    store = store_on(state_db, max_turns=1000)
    cid = store.create("k")["id"]
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda i: store.chat_done("k", f"r{i}", cid, {"question": f"q{i}", "answer": "a", "rag": {}}),
                             range(40)))
    assert all(done)
    seqs = [r[0] for r in state_db.execute("SELECT seq FROM turns WHERE conversation_id = :c ORDER BY seq", {"c": cid})]
    assert seqs == list(range(1, 41))


def test_every_ingress_replica_starts_the_purge_timer(local_cfg, tmp_path, monkeypatch):
    """A replica of the Serve ingress (no Ray needed to build one) purges on a timer of its own."""
    from serve.app import RagIngress

    data = local_cfg.model_dump()
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["conversations"]["purge_interval_s"] = 3600
    monkeypatch.setattr("flow.pipeline.Pipeline.ingest", lambda self: None)
    replica = RagIngress.__wrapped__(type(local_cfg).model_validate(data), None, None, None, None)
    store = replica.pipeline.governor.conversations
    try:
        assert store._purger is not None and store._purger.is_alive()
    finally:
        store.stop_purging()
