"""Cost per key (issue 18 item 5): prices per 1000 tokens (governor.pricing), engine seconds, their
sums per key per day in the usage ledger (and the columns added to a database made before them), a
daily budget per key that answers 429 insufficient_quota once spent, and GET /v1/usage showing
cost and the budget left."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from common.config import PricingConfig
from deployments.admission import Admission
from deployments.engine import engine_times
from deployments.governor import Governor
from deployments.limits import check_budget, cost_of
from state.db import Database, sqlite_url
from state.keys import SqlKeys
from state.usage import SqlUsage

NOV21 = datetime(2026, 11, 21, 20, 48, tzinfo=UTC).timestamp()
PRICES = {"input_per_1k": 0.5, "output_per_1k": 2.0, "currency": "EUR"}


def gov_cfg(local_cfg, tmp_path, *, auth=True, budget=None, key_cache_s=30):
    g = local_cfg.governor.model_dump()
    g.update(db=str(tmp_path / "gov.sqlite3"), pricing=PRICES, auth={"enabled": auth, "key_cache_s": key_cache_s})
    g["quotas"]["daily_budget"] = budget
    return type(local_cfg.governor).model_validate(g)


def state_at(path) -> Database:
    """The state database of the SQLite file ``path``, its schema upgraded (as a process opening it would)."""
    db = Database(sqlite_url(path))
    db.upgrade()
    return db


def governor_for(local_cfg, g) -> Governor:
    """The Governor of the app config with the governor section ``g`` (its SQLite file ``g.db``)."""
    return Governor(local_cfg.model_copy(update={"governor": g}))


def test_cost_of_is_the_price_per_thousand_tokens():
    p = PricingConfig(**PRICES)
    assert cost_of(p, 1000, 2000) == pytest.approx(0.5 + 4.0)
    assert cost_of(p, 300, 0) == pytest.approx(0.15)
    assert cost_of(PricingConfig(), 10_000, 10_000) == 0.0  # the default prices are 0


def test_the_ledger_sums_tokens_engine_seconds_and_cost_per_key_per_day(tmp_path):
    led = SqlUsage(state_at(tmp_path / "u.sqlite3"))
    led.record("k1", prompt_tokens=100, completion_tokens=20, prefill_s=0.5, decode_s=1.25, cost=0.09, now=NOV21)
    led.record("k1", prompt_tokens=50, completion_tokens=5, prefill_s=0.25, decode_s=0.5, cost=0.035, now=NOV21 + 60)
    led.record("k1", prompt_tokens=7, completion_tokens=3, cost=1.0, now=NOV21 + 86_400)  # the next UTC day
    led.record("k2", prompt_tokens=1, completion_tokens=1, cost=5.0, now=NOV21)
    u = led.usage("k1", now=NOV21)
    assert u["day"] == {"period": "2026-11-21", "requests": 2, "prompt_tokens": 150, "completion_tokens": 25,
                        "total_tokens": 175, "prefill_s": 0.75, "decode_s": 1.75, "engine_s": 2.5,
                        "cost": pytest.approx(0.125)}
    assert u["month"]["cost"] == pytest.approx(1.125) and u["month"]["requests"] == 3
    assert led.standing("k1", now=NOV21) == (175, 185, pytest.approx(0.125))  # what admission checks
    assert led.standing("nobody", now=NOV21) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="cost must be a finite number >= 0"):
        led.record("k1", prompt_tokens=1, completion_tokens=1, cost=-1.0)
    with pytest.raises(ValueError, match="prefill_s"):
        led.record("k1", prompt_tokens=1, completion_tokens=1, prefill_s=float("nan"))


def test_the_governor_prices_each_record_at_the_configured_prices(local_cfg, tmp_path):
    gov = governor_for(local_cfg, gov_cfg(local_cfg, tmp_path))
    _, key = gov.keys.create("priced", daily_budget=3.0)
    gov.record(key.id, 1000, 500, 0.2, 0.8)  # 0.5 + 1.0
    gov.record(key.id, 2000, 0)  # 1.0, no engine time known (the client left early)
    u = gov.usage(key.id)
    assert u["day"]["cost"] == pytest.approx(2.5) and u["day"]["engine_s"] == pytest.approx(1.0)
    assert u["currency"] == "EUR"
    assert u["limits"]["daily_budget"] == 3.0
    assert u["budget"] == {"daily": 3.0, "spent_today": pytest.approx(2.5), "left": pytest.approx(0.5)}
    rows = gov.all_usage()
    assert rows["currency"] == "EUR" and rows["data"][0]["day"]["cost"] == pytest.approx(2.5)


def test_an_old_database_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, scope TEXT NOT NULL,
            token_sha256 TEXT NOT NULL, created REAL NOT NULL, revoked REAL, chat_per_min REAL,
            search_per_min REAL, other_per_min REAL, daily_tokens INTEGER, monthly_tokens INTEGER);
        CREATE TABLE usage (key_id TEXT NOT NULL, period TEXT NOT NULL, requests INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, PRIMARY KEY (key_id, period));
        INSERT INTO api_keys VALUES ('0000abcd', 'old', 'user', 'x', 1.0, NULL, NULL, NULL, NULL, 500, NULL);
        INSERT INTO usage VALUES ('0000abcd', '2026-11-21', 3, 30, 12);
    """)
    conn.commit()
    conn.close()
    store, led = SqlKeys(state_at(db)), SqlUsage(state_at(db))  # two opens of one old file: the columns are added once
    key = store.get("0000abcd")
    assert key.daily_tokens == 500 and key.daily_budget is None
    day = led.usage("0000abcd", now=NOV21)["day"]
    assert (day["requests"], day["total_tokens"], day["cost"], day["engine_s"]) == (3, 42, 0.0, 0.0)
    led.record("0000abcd", prompt_tokens=10, completion_tokens=0, decode_s=0.5, cost=0.25, now=NOV21)
    day = led.usage("0000abcd", now=NOV21)["day"]
    assert (day["requests"], day["cost"], day["decode_s"]) == (4, 0.25, 0.5)
    _, new = store.create("new", daily_budget=1.5)
    assert store.get(new.id).daily_budget == 1.5
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(usage)")}
    assert {"prefill_s", "decode_s", "cost"} <= cols


def test_a_budget_must_be_a_positive_number(tmp_path):
    from state.keys import AuthError

    store = SqlKeys(state_at(tmp_path / "k.sqlite3"))
    for bad in (0, -1, "5", True):
        with pytest.raises(AuthError, match="daily_budget must be a number > 0"):
            store.create("x", daily_budget=bad)


def test_check_budget():
    assert check_budget(spent=0.99, budget=1.0).allowed
    assert check_budget(spent=100.0, budget=None).allowed
    d = check_budget(spent=1.0, budget=1.0, currency="EUR", now=NOV21)
    assert not d.allowed
    assert d.retry_after == pytest.approx(datetime(2026, 11, 22, tzinfo=UTC).timestamp() - NOV21)
    assert "daily budget spent: 1.0000 of 1 EUR" in d.message() and "resets in 3 h 12 min" in d.message()


def test_engine_times_prefer_vllms_timestamps_and_fall_back_to_the_clock():
    m = SimpleNamespace(scheduled_ts=100.0, first_token_ts=100.5, last_token_ts=103.0)
    assert engine_times(m, 0.0, 1.0, 9.0) == {"prefill": 0.5, "decode": 2.5}
    assert engine_times(None, 10.0, 10.25, 11.0) == {"prefill": 0.25, "decode": 0.75}
    assert engine_times(SimpleNamespace(scheduled_ts=0.0), 10.0, None, 11.0) == {"prefill": 1.0, "decode": 0.0}


# ---------------------------------------------------------------------------------------------
# admission: a spent budget is 429 insufficient_quota


def run(coro):
    return asyncio.run(coro)


def test_admission_refuses_chats_once_the_budget_is_spent(local_cfg, tmp_path):
    cfg = gov_cfg(local_cfg, tmp_path)
    gov = governor_for(local_cfg, cfg)
    token, key = gov.keys.create("budgeted", daily_budget=1.0)

    async def verify(t):
        return gov.verify(t)

    async def go():
        adm = Admission(cfg)
        first = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        gov.record(key.id, 1000, 0)  # 0.5 EUR, what the ingress sends the governor...
        adm.note_usage(key.id, 1000, adm.cost(1000, 0))  # ...and adds to its own snapshot
        second = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        adm.settle(key.id, 0, 1000, adm.cost(1000, 0))  # another 0.5: the budget is spent
        third = await adm.admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        search = await adm.admit(token, "10.0.0.1", "/v1/search", verify=verify)
        fresh = await Admission(cfg).admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)
        return first, second, third, search, fresh

    first, second, third, search, fresh = run(go())
    assert first.allowed and second.allowed
    assert (third.allowed, third.status, third.code) == (False, 429, "insufficient_quota")
    assert "daily budget spent" in third.message and third.key_id == key.id
    assert search.allowed  # a search costs nothing
    # another replica, from the governor's ledger: spent 0.5 there (the settle was this replica's own)
    assert fresh.allowed
    gov.record(key.id, 1000, 0)
    assert not run(Admission(cfg).admit(token, "10.0.0.1", "/v1/chat/completions", verify=verify)).allowed


def test_the_configs_budget_applies_to_keys_without_their_own(local_cfg, tmp_path):
    gov = governor_for(local_cfg, gov_cfg(local_cfg, tmp_path, budget=0.25))
    token, key = gov.keys.create("default budget")
    _, own = gov.keys.create("own budget", daily_budget=100.0)
    assert gov.verify(token).daily_budget == 0.25 and gov.verify(_).daily_budget == 100.0
    gov.record(key.id, 1000, 0)
    assert gov.verify(token).day_cost == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# the HTTP API: the 429 and GET /v1/usage


@pytest.fixture()
def app(local_cfg, built_index, tmp_path):
    from serve.local import create_app

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["governor"] = gov_cfg(local_cfg, tmp_path, key_cache_s=0).model_dump(mode="json")
    cfg = type(local_cfg).model_validate(data)
    api = create_app(cfg)
    return TestClient(api, client=("10.1.2.3", 50000)), api.state.pipeline.governor


def test_usage_shows_cost_and_budget_left_and_a_spent_budget_is_429(app):
    client, gov = app
    token, key = gov.keys.create("web", daily_budget=2.0)
    auth = {"Authorization": f"Bearer {token}"}
    gov.record(key.id, 1000, 250, 0.1, 0.4)  # 0.5 + 0.5 EUR
    u = client.get("/v1/usage", headers=auth)
    assert u.status_code == 200, u.text
    body = u.json()
    assert body["currency"] == "EUR" and body["day"]["cost"] == pytest.approx(1.0)
    assert body["day"]["prefill_s"] == pytest.approx(0.1) and body["day"]["decode_s"] == pytest.approx(0.4)
    assert body["budget"] == {"daily": 2.0, "spent_today": pytest.approx(1.0), "left": pytest.approx(1.0)}
    chat = {"model": "ragraph", "messages": [{"role": "user", "content": "When does the tasting room open?"}]}
    assert client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
    gov.record(key.id, 2000, 0)  # another 1.0: spent
    r = client.post("/v1/chat/completions", json=chat, headers=auth)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "insufficient_quota" and err["type"] == "insufficient_quota"
    assert "daily budget spent" in err["message"] and int(r.headers["retry-after"]) >= 1
    left = client.get("/v1/usage", headers=auth).json()["budget"]
    assert left["left"] == 0.0 and left["spent_today"] >= 2.0


def test_keys_create_takes_a_daily_budget(tmp_path, capsys):
    from cli.main import main

    db = tmp_path / "cli.sqlite3"
    assert main(["keys", "--db", str(db), "create", "team", "--daily-budget", "12.5", "--json"]) == 0
    made = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert made["daily_budget"] == 12.5
    assert SqlKeys(state_at(db)).get(made["id"]).daily_budget == 12.5
