"""Admission over HTTP without Ray: the in-process app (serve/local.py, the same routes and the same
ObservedRoute admission as the Serve ingress) with the real governor on a temporary SQLite file.
No request here reaches the generator (its engine is not started), so no vLLM is needed; the same
checks against the real graph are in test_serve_graph.py."""

from __future__ import annotations

import json
import logging
import time

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from serve.admission import client_ip
from state.db import Database, open_database, sqlite_url
from state.keys import SqlKeys
from state.usage import SqlUsage
from cli.main import main as cli
from serve.launch import auth_notice


def make_cfg(local_cfg, built_index, tmp_path, *, state=None, **governor):
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["state"].update(state or {})
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": True, **governor.pop("auth", {})}
    data["governor"]["rate_limits"].update(governor.pop("rate_limits", {}))
    data["http"].update(governor.pop("http", {}))
    return type(local_cfg).model_validate(data)


@pytest.fixture()
def service(local_cfg, built_index, tmp_path):
    def start(**governor):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, **governor)
        return TestClient(create_app(cfg)), SqlKeys(open_database(cfg)), cfg

    return start


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_openai_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_keys_are_required_except_for_health(service, caplog):
    client, keys, _ = service()
    token, _ = keys.create("alice")
    caplog.set_level(logging.DEBUG)
    assert client.get("/health").status_code == 200
    assert client.get("/health/ready").status_code in (200, 503)  # open: no 401 (the engine is not started)
    r = client.get("/v1/models")
    err = assert_openai_error(r, 401, "missing_api_key")
    assert "Authorization: Bearer" in err["message"] and r.headers["WWW-Authenticate"] == "Bearer"
    assert_openai_error(client.get("/v1/models", headers=bearer("rg-nope.nope")), 401, "invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers=bearer(token + "x")), 401, "invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": token}), 401, "missing_api_key")
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    assert client.post("/v1/search", json={"query": "tasting room hours"}, headers=bearer(token)).status_code == 200
    assert token not in caplog.text and token[-20:] not in caplog.text  # the key is never logged


def test_a_revoked_key_is_refused_at_once_without_a_key_cache(service):
    client, keys, _ = service(auth={"key_cache_s": 0})
    token, key = keys.create("bob")
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    keys.revoke(key.id)
    assert_openai_error(client.get("/v1/models", headers=bearer(token)), 401, "invalid_api_key")


def test_a_revoked_key_is_refused_within_key_cache_s(service):
    client, keys, _ = service(auth={"key_cache_s": 0.5})
    token, key = keys.create("bob")
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    keys.revoke(key.id)
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200  # the ingress's cached verdict
    time.sleep(0.6)
    assert_openai_error(client.get("/v1/models", headers=bearer(token)), 401, "invalid_api_key")


def test_metrics_need_a_metrics_or_admin_key_unless_opened(service):
    """With auth on, /metrics is closed by default: a user key gets 403, a key of scope metrics reads it
    (and nothing else), an admin key reads it; governor.auth.metrics_open opens it. No key id is a label."""
    client, keys, _ = service()
    assert_openai_error(client.get("/metrics"), 401, "missing_api_key")
    user, _ = keys.create("user")
    err = assert_openai_error(client.get("/metrics", headers=bearer(user)), 403, "insufficient_scope")
    assert "metrics" in err["message"]
    scrape, _ = keys.create("prometheus", "metrics")
    assert b"rag_http_requests_total" in client.get("/metrics", headers=bearer(scrape)).content
    assert_openai_error(client.get("/v1/models", headers=bearer(scrape)), 403, "insufficient_scope")
    admin, _ = keys.create("ops", "admin")
    assert client.get("/metrics", headers=bearer(admin)).status_code == 200
    client, keys, _ = service(auth={"metrics_open": True})
    assert client.get("/metrics").status_code == 200


def test_quota_metric_names_no_key():
    """rag_key_quota_used_ratio is the highest share of any key today, without a key_id label."""
    from flow.metrics import Metrics

    m = Metrics()
    m.saw_quota("key-a", {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "100"})
    m.saw_quota("key-b", {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "800"})
    text = m.render()
    text = text.decode() if isinstance(text, bytes) else text
    lines = [ln for ln in text.splitlines() if ln.startswith("rag_key_quota_used_ratio")]
    assert lines == ["rag_key_quota_used_ratio 0.9"], lines
    assert "key-a" not in text and "key-b" not in text
    m.saw_quota("key-a", {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000"})
    value = [ln for ln in m.render().decode().splitlines() if ln.startswith("rag_key_quota_used_ratio ")]
    assert abs(float(value[0].split()[1]) - 0.2) < 1e-9, value  # key-a's new share (0) replaced its 0.9


def test_admin_scope(service):
    client, keys, _ = service()
    user, _ = keys.create("user")
    admin, _ = keys.create("ops", "admin")
    err = assert_openai_error(client.delete("/v1/cache", headers=bearer(user)), 403, "insufficient_scope")
    assert "admin" in err["message"]
    assert_openai_error(client.get("/v1/cache/stats", headers=bearer(user)), 403, "insufficient_scope")
    assert client.delete("/v1/cache", headers=bearer(admin)).json() == {"object": "cache.cleared", "removed": 0}
    stats = client.get("/v1/cache/stats", headers=bearer(admin)).json()
    assert stats["enabled"] and {"hits", "misses", "entries", "max_entries", "ttl_s"} <= set(stats)


def test_rate_limit_per_key_is_429_with_retry_after(service):
    client, keys, _ = service(rate_limits={"per_ip": {"chat": 0, "search": 0, "other": 0}})
    slow, _ = keys.create("slow", search_per_min=2)
    other, _ = keys.create("other", search_per_min=2)
    body = {"query": "tasting room hours"}
    assert [client.post("/v1/search", json=body, headers=bearer(slow)).status_code for _ in range(2)] == [200, 200]
    r = client.post("/v1/search", json=body, headers=bearer(slow))
    err = assert_openai_error(r, 429, "rate_limit_exceeded")
    # a moving window of one minute: the next slot frees when the first request leaves it (about 60 s)
    assert "2 search requests per minute" in err["message"] and 50 <= int(r.headers["Retry-After"]) <= 60
    assert client.post("/v1/search", json=body, headers=bearer(other)).status_code == 200  # its own bucket
    assert client.get("/v1/models", headers=bearer(slow)).status_code == 200  # 'other' is a separate limit


def test_rate_limit_per_ip_holds_across_keys(service):
    client, keys, _ = service(rate_limits={"per_ip": {"search": 3}})
    tokens = [keys.create(f"k{i}")[0] for i in range(4)]
    codes = [client.post("/v1/search", json={"query": "wine"}, headers=bearer(t)).status_code for t in tokens]
    assert codes == [200, 200, 200, 429]


def test_quota_exhausted_is_429_and_usage_is_visible(service):
    client, keys, cfg = service()
    token, key = keys.create("thrifty", daily_tokens=100)
    SqlUsage(open_database(cfg)).record(key.id, prompt_tokens=80, completion_tokens=30)
    usage = client.get("/v1/usage", headers=bearer(token)).json()
    assert usage["object"] == "usage" and usage["key_id"] == key.id
    assert usage["day"]["total_tokens"] == 110 and usage["limits"]["daily_tokens"] == 100
    r = client.post("/v1/chat/completions", json={"model": "ragraph", "messages": [{"role": "user", "content": "hi"}]},
                    headers=bearer(token))
    err = assert_openai_error(r, 429, "insufficient_quota")
    assert "110 of 100" in err["message"] and int(r.headers["Retry-After"]) > 0
    assert client.post("/v1/search", json={"query": "wine"}, headers=bearer(token)).status_code == 200  # no tokens
    assert_openai_error(client.get("/v1/usage?all=true", headers=bearer(token)), 403, "insufficient_scope")
    admin, _ = keys.create("ops", "admin")
    rows = client.get("/v1/usage?all=true", headers=bearer(admin)).json()["data"]
    assert [(r["key_id"], r["name"], r["month"]["total_tokens"]) for r in rows] == [(key.id, "thrifty", 110)]
    other = client.get(f"/v1/usage?key_id={key.id}", headers=bearer(admin)).json()
    assert other["day"]["total_tokens"] == 110
    err = assert_openai_error(client.get("/v1/usage?key_id=nosuchid", headers=bearer(admin)), 404, "key_not_found")
    assert err["param"] == "key_id" and "nosuchid" in err["message"]


def test_the_state_database_down_is_a_quick_503_and_the_service_resumes_by_itself(
        local_cfg, built_index, tmp_path, postgres_server):
    """Auth on, the state in PostgreSQL: with the server stopped, a key the ingress has not cached
    cannot be checked, so the request fails closed with a 503 state_unavailable and Retry-After,
    within seconds (never hung); a key checked before still passes from the key cache; once the
    server is back the same request is 200 with nothing restarted."""
    from serve.local import create_app

    cfg = make_cfg(local_cfg, built_index, tmp_path, state={"url": postgres_server.url})
    keys = SqlKeys(open_database(cfg))
    cached, _ = keys.create("seen before")
    fresh, _ = keys.create("not seen yet")
    client = TestClient(create_app(cfg))
    assert client.get("/v1/models", headers=bearer(cached)).status_code == 200  # now in the key cache
    postgres_server.stop()
    try:
        t = time.monotonic()
        r = client.get("/v1/models", headers=bearer(fresh))
        took = time.monotonic() - t
        err = assert_openai_error(r, 503, "state_unavailable")
        assert err["type"] == "service_unavailable" and "state database" in err["message"]
        assert int(r.headers["Retry-After"]) >= 1 and took < 10, took
        assert client.get("/v1/models", headers=bearer(cached)).status_code == 200  # a cache hit asks nothing
    finally:
        postgres_server.start()
    r = client.get("/v1/models", headers=bearer(fresh))
    assert r.status_code == 200, r.text
    assert client.post("/v1/search", json={"query": "tasting room hours"}, headers=bearer(fresh)).status_code == 200


def test_body_size_limit_is_413_naming_the_limit(service):
    client, keys, _ = service(http={"limits": {"max_body_bytes": 2048}})
    token, _ = keys.create("big")
    r = client.post("/v1/search", content=json.dumps({"query": "w" * 4000}), headers={
        **bearer(token), "Content-Type": "application/json"})
    err = assert_openai_error(r, 413, "request_too_large")
    assert err["param"] == "body" and "2048" in err["message"]


def test_forwarded_for_is_trusted_only_from_configured_proxies():
    def req(peer: str, xff: str | None) -> Request:
        headers = [(b"x-forwarded-for", xff.encode())] if xff else []
        return Request({"type": "http", "client": (peer, 5000), "headers": headers, "method": "GET", "path": "/"})

    assert client_ip(req("10.0.0.5", "203.0.113.9"), ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_ip(req("10.0.0.5", "198.51.100.1, 203.0.113.9, 10.0.0.7"), ["10.0.0.0/8"]) == "203.0.113.9"
    assert client_ip(req("192.0.2.1", "203.0.113.9"), ["10.0.0.0/8"]) == "192.0.2.1"  # a forged header
    assert client_ip(req("10.0.0.5", "203.0.113.9"), []) == "10.0.0.5"


def test_auth_notice(local_cfg, built_index, tmp_path):
    off = local_cfg.model_copy(update={"http": local_cfg.http.model_copy(update={"host": "0.0.0.0"})})
    assert "auth is OFF" in auth_notice(off) and "0.0.0.0" in auth_notice(off)
    on = make_cfg(local_cfg, built_index, tmp_path)
    assert "no active key" in auth_notice(on)
    SqlKeys(open_database(on)).create("first")
    assert auth_notice(on) is None


def test_keys_cli(tmp_path, capsys):
    db = ["keys", "--db", str(tmp_path / "k.sqlite3")]
    assert cli([*db, "create", "ci bot", "--scope", "admin", "--json", "--chat-per-min", "5"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["key"].startswith(f"rg-{made['id']}.") and made["scope"] == "admin" and made["chat_per_min"] == 5
    assert cli([*db, "list"]) == 0
    listed = capsys.readouterr().out
    assert made["id"] in listed and "ci bot" in listed and made["key"] not in listed
    assert cli([*db, "revoke", made["id"]]) == 0 and "revoked" in capsys.readouterr().out
    assert cli([*db, "list"]) == 0 and made["id"] not in capsys.readouterr().out
    assert cli([*db, "revoke", "nosuchid"]) == 1 and "no key with id" in capsys.readouterr().err
    assert SqlKeys(Database(sqlite_url(tmp_path / "k.sqlite3"))).verify(made["key"]) is None


@pytest.mark.parametrize(("method", "path", "kw", "status"), [
    ("POST", "/v1/search", {"content": b"query=x", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, 400),
    ("POST", "/v1/search", {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}, 400),
    ("GET", "/v1/nowhere", {}, 404),
    ("PUT", "/v1/search", {}, 405),
])
def test_framework_errors_are_in_openai_format_too(service, method, path, kw, status):
    client, keys, _ = service()
    token, _ = keys.create("fuzz")
    kw = {**kw, "headers": {**kw.get("headers", {}), **bearer(token)}}
    r = client.request(method, path, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "detail" not in r.json()
