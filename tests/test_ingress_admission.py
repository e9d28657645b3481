"""Admission in the ingress as an attacker or a careless client meets it, on the in-process app
(serve/local.py: the same routes and admission as the Serve ingress; its engine is never started):

* no byte of a body is read before the caller is known (its key, its scope for an upload, its
  address's limit), and then only inside a queue slot, within a read deadline;
* Ray Serve's per-request timeout overrides are refused;
* a state-changing request from another web site is refused (cross-site request forgery on the
  keyless local default);
* a caller behind a proxy this service does not trust is neither loopback nor exempt;
* a chat's quota hold is what its prompt can really take, and a chat that could never fit its key's
  quota is a 400 saying why.

The same checks over real HTTP against the Ray graph are in test_serve_graph.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from state.db import open_database
from state.keys import SqlKeys


def make_cfg(local_cfg, built_index, tmp_path, *, auth=False, http=None, documents=None, rate_limits=None,
             generator=None, indexing=None):
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["indexing"].update(indexing or {})
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": auth}
    data["governor"]["rate_limits"].update(rate_limits or {})
    data["http"].update(http or {})
    data["documents"].update(documents or {})
    data["generator"].update(generator or {})
    return type(local_cfg).model_validate(data)


@pytest.fixture()
def app(local_cfg, built_index, tmp_path):
    made = []

    def start(**kw):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, **kw)
        api = create_app(cfg)
        made.append(api)
        return api, cfg

    yield start
    for api in made:
        ingest = getattr(api.state, "ingest", None)
        if ingest is not None:
            ingest.stop()


class Upload:
    """A raw ASGI request whose body arrives only when asked for, counting what the app read."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes = b"", *,
                 chunk: int = 65536, delay_s: float = 0.0, client=("127.0.0.1", 50000)):
        self.scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                      "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                      "root_path": "", "client": client, "server": ("127.0.0.1", 8000),
                      "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        self.body, self.chunk, self.delay_s = body, chunk, delay_s
        self.read = 0  # body bytes the app asked for and got
        self.status = None
        self.response = b""

    async def receive(self):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        part = self.body[self.read:self.read + self.chunk]
        self.read += len(part)
        return {"type": "http.request", "body": part, "more_body": self.read < len(self.body)}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.response += message.get("body", b"")

    def run(self, api, timeout: float = 30) -> Upload:
        async def go():
            await asyncio.wait_for(api(self.scope, self.receive, self.send), timeout)

        asyncio.run(go())
        return self

    def error(self) -> dict:
        return json.loads(self.response)["error"]


def upload_body(n: int = 2 * 1024 * 1024) -> bytes:
    return json.dumps({"documents": [{"id": "big.md", "text": "word " * (n // 5)}]}).encode()


def headers_for(body: bytes, token: str | None = None, **extra) -> dict[str, str]:
    h = {"host": "127.0.0.1:8000", "content-type": "application/json", "content-length": str(len(body)), **extra}
    if token:
        h["authorization"] = f"Bearer {token}"
    return h


# ---------------------------------------------------------------------------------------------
# no body byte before the caller is known


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(app):
    api, cfg = app(auth=True)
    body = upload_body()
    r = Upload("POST", "/v1/documents", headers_for(body), body).run(api)
    assert r.status == 401 and r.error()["code"] == "missing_api_key"
    assert r.read == 0, f"{r.read} body bytes were read before the key was checked"
    r = Upload("POST", "/v1/documents", headers_for(body, "rg-nope.nope"), body).run(api)
    assert r.status == 401 and r.read == 0


def test_an_upload_by_a_user_key_is_refused_before_its_body_is_read(app):
    api, cfg = app(auth=True)
    user, _ = SqlKeys(open_database(cfg)).create("user")
    body = upload_body()
    r = Upload("POST", "/v1/documents", headers_for(body, user), body).run(api)
    assert r.status == 403 and r.error()["code"] == "insufficient_scope" and r.read == 0


def test_an_address_over_its_limit_is_refused_before_its_body_is_read(app):
    api, cfg = app(auth=True, rate_limits={"per_ip": {"chat": 30, "search": 60, "other": 1}, "exempt_ips": []})
    body = upload_body(4096)
    first = Upload("POST", "/v1/documents", headers_for(body), body).run(api)
    assert first.status == 401 and first.read == 0  # a refused request still counts against its address
    r = Upload("POST", "/v1/documents", headers_for(body), body).run(api)
    assert r.status == 429 and r.read == 0


def test_a_chat_without_a_key_is_refused_before_its_body_is_read(app):
    api, _ = app(auth=True)
    body = json.dumps({"model": "ragraph", "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()
    r = Upload("POST", "/v1/chat/completions", headers_for(body), body).run(api)
    assert r.status == 401 and r.read == 0


def test_an_admin_upload_is_read_and_accepted(app, built_index, tmp_path):
    import shutil

    own = tmp_path / "own-index"  # the upload goes live: into a copy, not the session's shared index
    shutil.copytree(built_index[1], own, symlinks=True)
    api, cfg = app(auth=True, indexing={"dir": str(own)})
    admin, _ = SqlKeys(open_database(cfg)).create("ops", "admin")
    body = upload_body(200_000)
    r = Upload("POST", "/v1/documents", headers_for(body, admin), body).run(api)
    assert r.status == 202, r.response
    assert r.read == len(body)


def test_a_trickled_body_is_cut_off_at_the_read_deadline(app):
    api, cfg = app(auth=True, documents={"upload_timeout_s": 1.0}, http={"limits": {"body_timeout_s": 1.0}})
    admin, _ = SqlKeys(open_database(cfg)).create("ops", "admin")
    body = upload_body(64_000)
    r = Upload("POST", "/v1/documents", headers_for(body, admin), body, chunk=100, delay_s=0.05).run(api)
    assert r.status == 408, r.response
    err = r.error()
    assert err["code"] == "request_timeout" and "documents.upload_timeout_s" in err["message"]
    assert r.read < len(body)
    chat = json.dumps({"model": "ragraph", "messages": [{"role": "user", "content": "hi " * 2000}]}).encode()
    r = Upload("POST", "/v1/chat/completions", headers_for(chat, admin), chat, chunk=100, delay_s=0.05).run(api)
    assert r.status == 408 and "http.limits.body_timeout_s" in r.error()["message"]


def test_a_declared_length_over_the_limit_is_413_before_reading(app):
    api, cfg = app(auth=True, documents={"max_upload_bytes": 4096})
    admin, _ = SqlKeys(open_database(cfg)).create("ops", "admin")
    body = upload_body(100_000)
    r = Upload("POST", "/v1/documents", headers_for(body, admin), body).run(api)
    assert r.status == 413 and r.read == 0 and "documents.max_upload_bytes" in r.error()["message"]


@pytest.mark.parametrize(("header", "value"), [("x-request-timeout-seconds", "0"),
                                               ("x-request-timeout-seconds", "100000"),
                                               ("x-request-disconnect-disabled", "?1")])
def test_serve_timeout_overrides_are_refused(app, header, value):
    api, cfg = app(auth=True)
    admin, _ = SqlKeys(open_database(cfg)).create("ops", "admin")
    client = TestClient(api)
    r = client.post("/v1/search", json={"query": "tasting room"}, headers={
        "Authorization": f"Bearer {admin}", header: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "header_not_allowed" and err["param"] == header
    assert client.post("/v1/search", json={"query": "tasting room"},
                       headers={"Authorization": f"Bearer {admin}"}).status_code == 200


# ---------------------------------------------------------------------------------------------
# cross-site requests on the keyless local default


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:9999"},  # another local web app, another origin
    {"Sec-Fetch-Site": "cross-site"},
])
def test_a_cross_site_post_is_refused_with_auth_off(app, headers):
    api, _ = app(auth=False)
    client = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    form = {"files": ("poison.md", b"# Poison\n\nThe tasting room is closed for ever.", "text/markdown")}
    r = client.post("/v1/documents", files=form, headers=headers)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "cross_site_request"
    r = client.delete("/v1/cache", headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site_request"
    # reading is not state-changing: a GET from a page of another origin is not refused here
    assert client.get("/v1/models", headers=headers).status_code == 200


def test_same_origin_and_non_browser_posts_pass(app):
    api, _ = app(auth=False, http={"allowed_origins": ["https://console.example"]})
    client = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    q = {"query": "tasting room"}
    assert client.post("/v1/search", json=q).status_code == 200  # no Origin: not a browser
    assert client.post("/v1/search", json=q, headers={"Origin": "http://127.0.0.1:8000",
                                                        "Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post("/v1/search", json=q, headers={"Origin": "https://console.example"}).status_code == 200
    assert client.delete("/v1/cache", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    # behind a proxy that rewrites Host, the chat page's own requests still pass: the browser says same-origin
    assert client.post("/v1/search", json=q, headers={"Origin": "https://rag.example.com",
                                                        "Sec-Fetch-Site": "same-origin"}).status_code == 200
    r = client.post("/v1/search", json=q, headers={"Origin": "http://127.0.0.1:3000", "Sec-Fetch-Site": "same-site"})
    assert r.status_code == 403  # another port of the same site is another origin


# ---------------------------------------------------------------------------------------------
# a proxy this service does not trust


@pytest.mark.parametrize("header", [{"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"},
                                    {"X-Real-IP": "203.0.113.7"}])
def test_a_forwarded_request_from_loopback_is_not_local_with_auth_off(app, header):
    api, _ = app(auth=False)
    client = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    r = client.delete("/v1/cache", headers=header)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
    assert client.delete("/v1/cache").status_code == 200  # the operator on this machine, no proxy


@pytest.mark.parametrize(("header", "client", "forged"), [
    ("x-real-ip", {"X-Real-IP": "203.0.113.7"}, {"X-Forwarded-For": "127.0.0.1"}),
    ("forwarded", {"Forwarded": "for=203.0.113.7"}, {"X-Real-IP": "::1"}),
    ("x-forwarded-for", {"X-Forwarded-For": "127.0.0.1, 203.0.113.7"}, {"Forwarded": "for=127.0.0.1"}),
])
def test_a_trusted_proxys_client_is_read_from_its_header_only(app, header, client, forged):
    """Behind a trusted proxy the client's address comes from the one header that proxy writes
    (http.forwarded_header); another forwarding header, which the client may have sent through the
    proxy, never makes it loopback."""
    api, _ = app(auth=False, http={"trusted_proxies": ["127.0.0.1"], "forwarded_header": header})
    c = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    r = c.delete("/v1/cache", headers={**client, **forged})
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text


def test_a_trusted_proxy_relaying_a_loopback_client_is_local(app):
    api, _ = app(auth=False, http={"trusted_proxies": ["127.0.0.1"], "forwarded_header": "forwarded"})
    c = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    assert c.delete("/v1/cache", headers={"Forwarded": 'for="[::1]:4711"'}).status_code == 200


def test_exempt_loopback_does_not_exempt_clients_of_an_unknown_proxy(app):
    api, cfg = app(auth=True, rate_limits={"per_ip": {"chat": 30, "search": 2, "other": 100},
                                           "per_key": {"chat": 30, "search": 1000, "other": 100},
                                           "exempt_ips": ["127.0.0.1", "::1"]})
    token, _ = SqlKeys(open_database(cfg)).create("k")
    client = TestClient(api, base_url="http://127.0.0.1:8000", client=("127.0.0.1", 50000))
    auth = {"Authorization": f"Bearer {token}"}
    q = {"query": "tasting room"}
    assert [client.post("/v1/search", json=q, headers=auth).status_code for _ in range(4)] == [200] * 4  # exempt
    proxied = {**auth, "X-Forwarded-For": "198.51.100.4"}
    codes = [client.post("/v1/search", json=q, headers=proxied).status_code for _ in range(3)]
    assert codes == [200, 200, 429], codes


# ---------------------------------------------------------------------------------------------
# the quota hold of a chat


CHAT = {"model": "ragraph", "messages": [{"role": "user", "content": "When does the tasting room open?"}]}


def hold_of(cfg, body: dict) -> int:
    from serve.admission import quota_hold

    class Raw:
        _body = json.dumps(body).encode()

    return quota_hold(Raw(), cfg)


def quota_app(app, daily):
    api, cfg = app(auth=True, generator={"answer_mode": "extractive"})
    daily = daily(cfg)
    token, _ = SqlKeys(open_database(cfg)).create("small", daily_tokens=daily)
    return TestClient(api), {"Authorization": f"Bearer {token}"}, cfg, daily


def test_a_chat_that_fits_the_real_context_budget_is_admitted(app):
    """The hold is what the prompt builder may fill (instructions, the request, generator.context_tokens
    of passages) plus the answer, not the whole context window: a key whose daily quota is above that
    but below the window is served."""
    client, auth, cfg, daily = quota_app(app, lambda cfg: hold_of(cfg, CHAT) + 50)
    assert daily < cfg.generator.max_model_len
    r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert r.status_code == 200, r.text
    assert "tasting room" in r.json()["choices"][0]["message"]["content"].lower()
    assert r.json()["usage"]["prompt_tokens"] <= hold_of(cfg, CHAT)  # the hold covers what was spent


def test_a_chat_that_can_never_fit_the_keys_quota_is_400_saying_why(app):
    client, auth, cfg, daily = quota_app(app, lambda cfg: hold_of(cfg, CHAT) - 20)
    r = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "request_exceeds_quota" and str(daily) in err["message"] and "never" in err["message"]
    assert "Retry-After" not in r.headers
