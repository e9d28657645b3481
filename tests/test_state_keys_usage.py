"""API keys (state/keys.py) and the usage ledger (state/usage.py) over the state database, each
test on a SQLite file and on a real PostgreSQL server (``state_db``): tokens hashed, verify,
revoke, per-key limits, usage per UTC day and month, exactly-once charging by request id, many
threads recording at once, the purge of old request ids, and the 0002 migration."""

import hashlib
import inspect
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text
from state_fixtures import fresh_postgres, state_db  # noqa: F401  (state_db: a fixture)

import state.usage as usage_module
from state.db import Database, head_revision
from state.keys import ApiKey, AuthError, Keys, SqlKeys, token_hash, well_formed
from state.usage import SqlUsage, Usage, periods

REPO = Path(__file__).resolve().parent.parent


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


NOV21 = ts(2026, 11, 21, 20, 48)


@pytest.fixture
def far_from_utc(monkeypatch):
    """Local time 10 h behind UTC, so a period computed in local time instead of UTC is caught."""
    monkeypatch.setenv("TZ", "XXX+10")  # POSIX TZ string: needs no tz database
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def store(state_db):  # noqa: F811
    return SqlKeys(state_db)


@pytest.fixture
def led(state_db):  # noqa: F811
    return SqlUsage(state_db)


def reopened(db: Database) -> Database:
    """Another Database on the same URL: what another process or replica sees."""
    return Database(db.url)


# ---------------------------------------------------------------- the ports


@pytest.mark.parametrize(("impl", "port"), [(SqlKeys, Keys), (SqlUsage, Usage)])
def test_the_sql_stores_have_their_ports_signatures(impl, port):
    methods = [n for n, v in vars(port).items() if callable(v) and not n.startswith("_")]
    assert methods, port
    for name in methods:
        assert inspect.signature(getattr(impl, name)) == inspect.signature(getattr(port, name)), name


def test_token_helpers():
    assert well_formed("rg-0123abcd.secret") and not well_formed("rg-0123abc.secret")
    assert not well_formed(None) and not well_formed("rg-0123abcd.") and not well_formed("x" * 300)
    assert token_hash("rg-0123abcd.s") == hashlib.sha256(b"rg-0123abcd.s").hexdigest()


# ---------------------------------------------------------------- keys


def test_token_is_never_stored_in_plaintext(store, state_db):  # noqa: F811
    tokens = [store.create(f"k{i}")[0] for i in range(3)]
    secrets_ = [t.split(".", 1)[1] for t in tokens]
    with state_db.read() as c:
        result = c.execute(text("SELECT * FROM api_keys"))
        cols = list(result.keys())
        rows = result.all()
    assert len(rows) == 3
    cells = [str(v) for row in rows for v in row]
    assert not any(s in cell for s in secrets_ for cell in cells)
    stored = {row[cols.index("token_sha256")] for row in rows}
    assert stored == {hashlib.sha256(t.encode()).hexdigest() for t in tokens}
    if state_db.dialect == "sqlite":  # the file itself, and its -wal file (where the rows are until a checkpoint)
        raw = b"".join(p.read_bytes() for p in state_db.path.parent.iterdir() if p.is_file())
        for token, secret in zip(tokens, secrets_, strict=True):
            assert token.encode() not in raw and secret.encode() not in raw


def test_token_format_and_public_view(store):
    token, key = store.create("ci bot")
    assert token.startswith(f"rg-{key.id}.")
    assert len(key.id) == 8 and key.id == key.id.lower() and all(c in "0123456789abcdef" for c in key.id)
    assert len(token.split(".", 1)[1]) >= 43  # token_urlsafe(32)
    pub = key.public()
    assert pub["id"] == key.id and pub["name"] == "ci bot" and pub["scope"] == "user" and pub["active"] is True
    assert not any(token.split(".", 1)[1] in str(v) for v in pub.values())
    assert "token_sha256" not in pub


def test_verify(store):
    token, key = store.create("alice")
    other, _ = store.create("bob")
    assert store.verify(token) == key
    key_part, secret = token.split(".", 1)
    assert store.verify(f"{key_part}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}") is None  # wrong secret
    assert store.verify(f"{key_part}.{other.split('.', 1)[1]}") is None  # another key's secret
    malformed = ["", "rg-", "bearer", token.replace(".", "-"), token[3:], f"rg-{key.id}.", f"rg-{key.id}x.{secret}", None]
    for bad in malformed:
        assert store.verify(bad) is None, bad  # malformed
    assert store.verify(f"rg-zzzzzzzz.{secret}") is None  # well-formed, unknown id
    store.revoke(key.id)
    assert store.verify(token) is None  # revoked
    assert store.verify(other) is not None


def test_a_revoked_key_stops_verifying_everywhere_at_once(store, state_db):  # noqa: F811
    token, key = store.create("alice")
    kept, _ = store.create("bob")
    replica = reopened(state_db)  # another ingress replica over the same database
    try:
        theirs = SqlKeys(replica)
        assert theirs.verify(token) == key
        revoked = theirs.revoke(key.id)
        assert revoked.revoked is not None and revoked.revoked >= key.created and not revoked.active
        assert store.verify(token) is None and theirs.verify(token) is None  # the next verify fails, here and there
        assert store.get(key.id) == revoked  # still listed (with include_revoked) and gettable
        assert [k.id for k in store.list(include_revoked=True) if not k.active] == [key.id]
        assert store.verify(kept) is not None and store.count_active() == 1
    finally:
        replica.close()


def test_scopes_and_bad_arguments(store):
    assert store.create("ops", "admin")[1].scope == "admin"
    assert store.create("app")[1].scope == "user"
    assert store.create("prometheus", "metrics")[1].scope == "metrics"
    with pytest.raises(AuthError, match=r"scope must be one of \['user', 'admin', 'metrics'\], got 'root'"):
        store.create("x", "root")
    with pytest.raises(AuthError, match="name must be 1 to 100 characters"):
        store.create("   ")
    with pytest.raises(AuthError, match="name must be 1 to 100 characters"):
        store.create("n" * 101)
    with pytest.raises(AuthError, match=r"2 error\(s\).*chat_per_min must be a number > 0.*daily_tokens must be an integer"):
        store.create("x", chat_per_min=0, daily_tokens=1.5)
    with pytest.raises(AuthError, match=r"daily_budget must be a number > 0"):
        store.create("x", daily_budget=float("nan"))
    assert store.count_active() == 3  # nothing was written by the refused calls


def test_overrides_round_trip(store, state_db):  # noqa: F811
    _, key = store.create("limited", chat_per_min=5, daily_tokens=1000, monthly_tokens=20_000, daily_budget=2)
    again_db = reopened(state_db)
    try:
        again = SqlKeys(again_db).get(key.id)
    finally:
        again_db.close()
    assert again == key
    assert (again.chat_per_min, again.search_per_min) == (5.0, None)
    assert (again.daily_tokens, again.monthly_tokens, again.daily_budget) == (1000, 20_000, 2.0)
    assert type(again.daily_tokens) is int and type(again.chat_per_min) is float
    assert again.rate_overrides() == {"chat": 5.0, "search": None, "other": None}


def test_revoke_list_and_count(store):
    keys = [store.create(n)[1] for n in ["a", "b", "c"]]
    assert [k.name for k in store.list()] == ["a", "b", "c"]
    assert store.count_active() == 3
    first = store.revoke(keys[1].id)
    assert first.revoked is not None and not first.active
    again = store.revoke(keys[1].id)
    assert again.revoked == first.revoked  # keeps the first revoke time
    assert [k.name for k in store.list()] == ["a", "c"]
    assert [k.name for k in store.list(include_revoked=True)] == ["a", "b", "c"]
    assert store.count_active() == 2
    assert store.get("nope") is None


def test_revoke_unknown_is_a_clear_error(store):
    with pytest.raises(AuthError, match=r"no key with id 'deadbeef'; `ragraph keys list` shows them"):
        store.revoke("deadbeef")
    assert store.count_active() == 0


def test_an_id_clash_is_not_an_error(store, monkeypatch):
    ids = iter(["0000aaaa", "0000aaaa", "0000bbbb"])
    monkeypatch.setattr("state.keys.secrets.token_hex", lambda n: next(ids))
    first = store.create("one")[1]
    token, second = store.create("two")  # 0000aaaa is taken: the next id is drawn
    assert (first.id, second.id) == ("0000aaaa", "0000bbbb")
    assert store.verify(token) == second and store.count_active() == 2


def test_sqlite_wal_mode_and_full_sync(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    try:
        db.upgrade()
        SqlKeys(db).create("a")
        conn = sqlite3.connect(db.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent, seen by any connection
        conn.close()
        with db.read() as c:
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        db.close()


# ---------------------------------------------------------------- usage


ZERO = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
        "prefill_s": 0.0, "decode_s": 0.0, "engine_s": 0.0, "cost": 0.0}


def test_usage_counts_and_zeros(led):
    assert led.usage("k1", now=NOV21) == {
        "key_id": "k1",
        "day": {"period": "2026-11-21", **ZERO},
        "month": {"period": "2026-11", **ZERO},
    }
    assert led.record("k1", prompt_tokens=100, completion_tokens=20, now=NOV21) is True
    assert led.record("k1", prompt_tokens=50, completion_tokens=5, now=NOV21 + 60) is True
    led.record("k2", prompt_tokens=1, completion_tokens=1, now=NOV21)
    u = led.usage("k1", now=NOV21)
    assert u["day"] == {
        "period": "2026-11-21", "requests": 2, "prompt_tokens": 150, "completion_tokens": 25, "total_tokens": 175,
        "prefill_s": 0.0, "decode_s": 0.0, "engine_s": 0.0, "cost": 0.0,  # no engine time or price given
    }  # fmt: skip
    assert u["month"]["total_tokens"] == 175 and u["month"]["requests"] == 2
    assert led.standing("k1", now=NOV21) == (175, 175, 0.0)
    assert led.standing("nobody", now=NOV21) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="prompt_tokens must be an integer >= 0, got -1"):
        led.record("k1", prompt_tokens=-1, completion_tokens=0, now=NOV21)
    with pytest.raises(ValueError, match="cost must be a finite number >= 0, got inf"):
        led.record("k1", prompt_tokens=1, completion_tokens=0, cost=float("inf"), now=NOV21)
    with pytest.raises(ValueError, match="request_id must be a string of 1 to 200 characters"):
        led.record("k1", prompt_tokens=1, completion_tokens=0, request_id="", now=NOV21)
    assert led.standing("k1", now=NOV21) == (175, 175, 0.0)


def test_engine_seconds_and_cost_add_up(led):
    led.record("k", prompt_tokens=10, completion_tokens=5, prefill_s=0.25, decode_s=1.5, cost=0.001, now=NOV21)
    led.record("k", prompt_tokens=10, completion_tokens=5, prefill_s=0.5, decode_s=0.5, cost=0.002, now=NOV21)
    day = led.usage("k", now=NOV21)["day"]
    assert (day["prefill_s"], day["decode_s"], day["engine_s"], day["cost"]) == (0.75, 2.0, 2.75, 0.003)
    assert led.standing("k", now=NOV21) == (30, 30, 0.003)


def test_usage_survives_a_restart(state_db):  # noqa: F811
    SqlKeys(state_db).create("shares the database")
    SqlUsage(state_db).record("k1", prompt_tokens=7, completion_tokens=3, now=NOV21)
    state_db.close()
    fresh = reopened(state_db)  # a new process would do exactly this
    try:
        assert SqlUsage(fresh).standing("k1", now=NOV21) == (10, 10, 0.0)
        assert SqlKeys(fresh).count_active() == 1
    finally:
        fresh.close()


def test_usage_survives_sigkill_right_after_record(state_db):  # noqa: F811
    script = textwrap.dedent(
        f"""
        import sys, time
        from state.db import Database
        from state.usage import SqlUsage
        SqlUsage(Database({state_db.url!r})).record("k1", prompt_tokens=40, completion_tokens=2, now={NOV21})
        print("recorded", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "recorded"
        os.kill(proc.pid, signal.SIGKILL)  # no close, no atexit, no checkpoint
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    led = SqlUsage(state_db)
    assert led.usage("k1", now=NOV21)["day"]["requests"] == 1
    assert led.standing("k1", now=NOV21) == (42, 42, 0.0)


def test_day_and_month_rollover(led, far_from_utc):
    led.record("k", prompt_tokens=10, completion_tokens=0, now=ts(2026, 11, 29, 23, 59, 59))
    led.record("k", prompt_tokens=20, completion_tokens=0, now=ts(2026, 11, 30, 0, 0, 1))  # new day, same month
    u = led.usage("k", now=ts(2026, 11, 30, 12))
    assert (u["day"]["period"], u["day"]["total_tokens"]) == ("2026-11-30", 20)
    assert (u["month"]["period"], u["month"]["total_tokens"]) == ("2026-11", 30)
    led.record("k", prompt_tokens=5, completion_tokens=0, now=ts(2026, 12, 1, 0, 0, 1))  # new month
    assert led.standing("k", now=ts(2026, 12, 1, 1))[:2] == (5, 5)
    assert led.usage("k", now=ts(2026, 12, 1, 1))["month"]["period"] == "2026-12"
    assert led.standing("k", now=ts(2026, 11, 30, 23))[:2] == (20, 30)  # earlier periods are kept
    assert periods(ts(2026, 12, 31, 23, 59, 59)) == ("2026-12-31", "2026-12")
    assert periods(ts(2027, 1, 1)) == ("2027-01-01", "2027-01")


def test_all_usage_is_this_month_sorted(led):
    led.record("zz", prompt_tokens=1, completion_tokens=0, now=NOV21)
    led.record("aa", prompt_tokens=2, completion_tokens=0, now=NOV21 - 5 * 86400)  # this month, not today
    led.record("old", prompt_tokens=3, completion_tokens=0, now=ts(2026, 10, 5))
    rows = led.all_usage(now=NOV21)
    assert [r["key_id"] for r in rows] == ["aa", "zz"]
    assert rows[0] == led.usage("aa", now=NOV21)
    assert rows[0]["month"]["total_tokens"] == 2 and rows[0]["day"]["total_tokens"] == 0
    assert rows[1]["day"]["total_tokens"] == 1
    assert led.all_usage(now=ts(2027, 1, 1)) == []


# ---------------------------------------------------------------- exactly once


def test_a_request_is_charged_once(led, state_db):  # noqa: F811
    assert led.record("k", prompt_tokens=10, completion_tokens=5, cost=0.5, request_id="r1", now=NOV21) is True
    assert led.record("k", prompt_tokens=10, completion_tokens=5, cost=0.5, request_id="r1", now=NOV21) is False
    assert led.record("k", prompt_tokens=99, completion_tokens=99, request_id="r1", now=NOV21 + 3600) is False
    u = led.usage("k", now=NOV21)
    assert (u["day"]["requests"], u["day"]["total_tokens"], u["day"]["cost"]) == (1, 15, 0.5)
    assert (u["month"]["requests"], u["month"]["total_tokens"]) == (1, 15)
    assert led.record("k", prompt_tokens=1, completion_tokens=1, request_id="r2", now=NOV21) is True  # another request
    assert led.record("other", prompt_tokens=1, completion_tokens=0, request_id="r1", now=NOV21) is True  # another key
    assert led.record("k", prompt_tokens=1, completion_tokens=1, now=NOV21) is True  # no id: always counted
    assert led.record("k", prompt_tokens=1, completion_tokens=1, now=NOV21) is True
    assert led.standing("k", now=NOV21) == (21, 21, 0.5)
    assert led.usage("k", now=NOV21)["day"]["requests"] == 4
    assert led.standing("other", now=NOV21) == (1, 1, 0.0)
    rows = state_db.execute("SELECT key_id, request_id FROM usage_requests ORDER BY key_id, request_id")
    assert [tuple(r) for r in rows] == [("k", "r1"), ("k", "r2"), ("other", "r1")]


def test_the_id_and_the_counters_are_one_transaction(led, state_db, monkeypatch):  # noqa: F811
    real = usage_module.periods

    def broken(now=None):
        raise RuntimeError("the database went away mid-record")

    monkeypatch.setattr(usage_module, "periods", broken)  # fails after the id is written, before the counters
    with pytest.raises(RuntimeError, match="went away"):
        led.record("k", prompt_tokens=10, completion_tokens=0, request_id="r1", now=NOV21)
    assert state_db.execute("SELECT COUNT(*) FROM usage_requests")[0][0] == 0  # the id went with the rollback
    monkeypatch.setattr(usage_module, "periods", real)
    assert led.record("k", prompt_tokens=10, completion_tokens=0, request_id="r1", now=NOV21) is True  # the retry counts
    assert led.standing("k", now=NOV21) == (10, 10, 0.0)


def _threads(n: int, work) -> list:
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


def test_concurrent_records_from_8_threads_sum_exactly(led):
    def work(i: int) -> int:
        for j in range(50):
            assert led.record("k", prompt_tokens=i + 1, completion_tokens=1, cost=0.01,
                              request_id=f"t{i}-{j}", now=NOV21) is True
        return 50

    assert sum(_threads(8, work)) == 400
    u = led.usage("k", now=NOV21)
    prompt = 50 * sum(range(1, 9))  # 1800
    for period in ("day", "month"):
        assert u[period]["requests"] == 400
        assert (u[period]["prompt_tokens"], u[period]["completion_tokens"]) == (prompt, 400)
    assert u["day"]["cost"] == pytest.approx(4.0)


def test_concurrent_retries_of_the_same_requests_charge_each_once(led):
    def work(i: int) -> int:  # all 8 threads record the same 50 requests
        return sum(led.record("k", prompt_tokens=3, completion_tokens=2, request_id=f"r{j}", now=NOV21)
                   for j in range(50))

    assert sum(_threads(8, work)) == 50
    u = led.usage("k", now=NOV21)
    assert (u["day"]["requests"], u["day"]["total_tokens"]) == (50, 250)
    assert (u["month"]["requests"], u["month"]["total_tokens"]) == (50, 250)


def test_purge_forgets_old_request_ids_in_batches(led, state_db):  # noqa: F811
    now = NOV21
    for j in range(25):
        led.record("k", prompt_tokens=1, completion_tokens=0, request_id=f"old{j}", now=now - 3 * 86400)
    for j in range(3):
        led.record("k", prompt_tokens=1, completion_tokens=0, request_id=f"new{j}", now=now - 3600)
    statements: list[str] = []

    def seen(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("DELETE"):
            statements.append(statement)

    from sqlalchemy import event

    event.listen(state_db.engine, "before_cursor_execute", seen)
    try:
        assert led.purge_requests(older_than_s=2 * 86400, batch=10, now=now) == 25
    finally:
        event.remove(state_db.engine, "before_cursor_execute", seen)
    assert len(statements) == 3  # 10 + 10 + 5, one transaction each
    left = state_db.execute("SELECT request_id FROM usage_requests ORDER BY request_id")
    assert [r[0] for r in left] == ["new0", "new1", "new2"]
    assert led.usage("k", now=now)["month"]["requests"] == 28  # the counters are kept
    assert led.record("k", prompt_tokens=1, completion_tokens=0, request_id="new0", now=now) is False
    assert led.purge_requests(now=now) == 0  # the default: two days
    assert led.purge_requests(older_than_s=0, now=now + 1) == 3
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        led.purge_requests(batch=0)


# ---------------------------------------------------------------- the 0002 migration


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_0002_upgrades_a_0001_database_rows_kept(backend, request, tmp_path):
    url = (f"sqlite:///{tmp_path / 'state.sqlite3'}" if backend == "sqlite"
           else fresh_postgres(request.getfixturevalue("postgres_url")))
    db = Database(url)
    try:
        assert db.upgrade("0001") == (None, "0001")
        with db.read() as c:
            assert not sa_inspect(c).has_table("usage_requests")
        token, key = SqlKeys(db).create("from before", daily_tokens=500)
        led = SqlUsage(db)
        assert led.record("k", prompt_tokens=4, completion_tokens=3, now=NOV21) is True  # no id: 0001 suffices

        before, after = db.upgrade()
        assert (before, after) == ("0001", head_revision()) and db.revision() == head_revision()
        with db.read() as c:
            insp = sa_inspect(c)
            assert insp.get_pk_constraint("usage_requests")["constrained_columns"] == ["key_id", "request_id"]
            assert {i["name"]: i["column_names"] for i in insp.get_indexes("usage_requests")} == {
                "usage_requests_created": ["created"]}
        assert SqlKeys(db).verify(token) == key  # rows kept
        assert led.standing("k", now=NOV21) == (7, 7, 0.0)
        assert led.record("k", prompt_tokens=1, completion_tokens=0, request_id="r", now=NOV21) is True
        assert led.record("k", prompt_tokens=1, completion_tokens=0, request_id="r", now=NOV21) is False
        assert led.usage("k", now=NOV21)["day"]["requests"] == 2
    finally:
        db.close()


# ---------------------------------------------------------------- the SQLite file's permissions


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask, under which files were created 0644
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_the_sqlite_state_file_is_created_0600_in_0700_folders(tmp_path, umask_022):
    path = tmp_path / "made" / "by-us" / "state.sqlite3"
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
        SqlKeys(db).create("alice")
        SqlUsage(db).record("k", prompt_tokens=1, completion_tokens=2, request_id="r")
        assert oct(mode(path)) == oct(0o600)
        for side in ("-wal", "-shm"):  # SQLite gives them the database's mode
            f = path.with_name(path.name + side)
            if f.exists():
                assert oct(mode(f)) == oct(0o600), f.name
        assert oct(mode(path.parent)) == oct(0o700) and oct(mode(path.parent.parent)) == oct(0o700)
    finally:
        db.close()


def test_an_existing_folder_is_left_alone_and_an_open_file_tightened(tmp_path, umask_022):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    path = shared / "state.sqlite3"
    path.touch(mode=0o644)
    db = Database(f"sqlite:///{path}")
    try:
        db.upgrade()
        assert SqlKeys(db).count_active() == 0
        assert oct(mode(path)) == oct(0o600) and oct(mode(shared)) == oct(0o755)
    finally:
        db.close()


def test_api_key_is_frozen():
    key = ApiKey("0123abcd", "n", "user", 1.0, None)
    with pytest.raises(AttributeError):
        key.name = "m"  # type: ignore[misc]
    assert key.active and key.public()["active"] is True
