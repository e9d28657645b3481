"""The chat page (serve/ui.py, serve/static/) in a real browser: Debian's chromium driven by
Playwright for Python (never `playwright install`: the system browser is launched by path).

One server for the module: the in-process app (serve/local.py) under uvicorn in a thread, with the
real vLLM engine (1-2 minutes to start on 2 CPU cores), auth on, answers of at most 24 tokens.

Screenshots (an answer with its sources open; the conversation list) and the page's requests with
their timings for one question go to ``$RAGRAPH_UI_ARTIFACTS`` when set, else to a temporary folder:
the test never writes tracked files (docs/img/ holds copies made by hand).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

try:
    from playwright import sync_api
except ImportError:
    sync_api = None
CHROMIUM = shutil.which("chromium")

QUESTION = "When does the tasting room open?"
WAIT_MS = 120_000  # an answer on a busy 2-core machine; a bound, not an assertion on speed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    folder = os.environ.get("RAGRAPH_UI_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("ui")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(local_cfg, built_index, tmp_path_factory):
    """(base URL, user key, admin key): the page's service, auth on, one per module."""
    import uvicorn

    from serve.local import create_app
    from state.db import open_database
    from state.keys import SqlKeys

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["governor"]["db"] = str(tmp_path_factory.mktemp("ui-governor") / "gov.sqlite3")
    data["governor"]["auth"] = {"enabled": True}
    data["generator"].update(max_tokens=24)  # short answers: the tests are about the page, not the model
    cfg = type(local_cfg).model_validate(data)
    keys = SqlKeys(open_database(cfg))  # the state database the app opens too (state.url unset: governor.db)
    user, _ = keys.create("page-user")
    admin, _ = keys.create("page-admin", scope="admin")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, name="ui-server", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:  # the engine's start: wait until /health/ready says so (or the server thread died)
        try:
            if httpx.get(base + "/health/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert thread.is_alive(), "the server thread ended before it was ready"
        assert time.monotonic() < deadline, "the service was not ready within 10 minutes"
        time.sleep(1)
    try:
        yield base, user, admin
    finally:
        srv.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="module")
def browser():
    # `make test` installs both: a missing one is a broken install, not a reason to skip the page's tests
    if sync_api is None:
        pytest.fail("playwright is not installed: `make test` installs it (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (make chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    pg.external = []  # requests to anywhere but the service: there must be none
    pg.on("request", lambda r: None if r.url.startswith(server[0]) else pg.external.append(r.url))
    yield pg
    assert pg.external == [], f"the page fetched from elsewhere: {pg.external}"
    context.close()


def enter_key(page, key: str) -> None:
    dialog = page.locator("#key-dialog")
    sync_api.expect(dialog).to_be_visible()
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Use this key").click()


def open_page(page, server) -> None:
    base, user, _ = server
    page.goto(base + "/")
    enter_key(page, user)
    sync_api.expect(page.locator("#key-dialog")).to_be_hidden()
    page.wait_for_selector("body[data-ready=true]")


def ask(page, question: str):
    """Type the question, press Enter; returns the answer's turn once its answer has ended."""
    turns = page.locator(".turn")
    n = turns.count()
    box = page.get_by_label("Your question")
    box.fill(question)
    box.press("Enter")
    turn = turns.nth(n)
    sync_api.expect(turn.locator(".question .text")).to_have_text(question)
    sync_api.expect(turn.locator(".timings")).to_contain_text("total", timeout=WAIT_MS)
    return turn


def test_a_wrong_key_shows_an_error_and_a_right_key_works(page, server):
    base, user, _ = server
    page.goto(base + "/")
    enter_key(page, "rg-00000000.not-a-key")
    err = page.locator("#key-error")
    sync_api.expect(err).to_be_visible()
    sync_api.expect(err).to_contain_text("not valid")
    sync_api.expect(page.locator("#key-dialog")).to_be_visible()  # still asking
    assert page.evaluate("sessionStorage.getItem('ragraph.key')") is None  # a wrong key is not kept
    enter_key(page, user)
    sync_api.expect(page.locator("#key-dialog")).to_be_hidden()
    page.wait_for_selector("body[data-ready=true]")
    assert user not in page.url  # the key is never in the URL
    assert page.evaluate("sessionStorage.getItem('ragraph.key')") == user


def test_a_question_streams_its_answer_and_shows_its_sources(page, server, artifacts):
    open_page(page, server)
    box = page.get_by_label("Your question")
    box.press_sequentially("first line")
    box.press("Shift+Enter")
    box.press_sequentially("second line")
    assert box.input_value() == "first line\nsecond line" and page.locator(".turn").count() == 0  # not sent
    # count the answer's text updates while it streams: more than one means it arrived in pieces
    page.evaluate("""() => { window.__updates = 0; new MutationObserver(() => window.__updates++)
        .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.evaluate("performance.clearResourceTimings()")
    t0 = page.evaluate("performance.now()")
    turn = ask(page, QUESTION)
    answer = turn.locator(".answer .text").inner_text()
    assert answer.strip(), "the answer is empty"
    assert page.evaluate("window.__updates") >= 3  # the turn, then at least two pieces of the answer
    timings = turn.locator(".timings").inner_text()
    assert "first token" in timings and "total" in timings
    sources = turn.locator(".source-list li")
    assert sources.count() >= 1
    titles = [sources.nth(i).locator("summary .title").inner_text() for i in range(sources.count())]
    assert "Opening hours" in titles, titles
    hours = sources.nth(titles.index("Opening hours"))
    excerpt = hours.locator("blockquote")
    sync_api.expect(excerpt).to_be_hidden()
    hours.locator("summary").click()  # expand it
    sync_api.expect(excerpt).to_be_visible()
    sync_api.expect(excerpt).to_contain_text("10 am")
    assert turn.get_attribute("data-request-id")
    page.screenshot(path=str(artifacts / "chat-answer-sources.png"), full_page=True)
    # the page's requests and their timings for this one question (the closing note's table)
    entries = page.evaluate("""(t0) => performance.getEntriesByType('resource')
        .filter(e => e.startTime >= t0 - 5)
        .map(e => ({url: new URL(e.name).pathname, start_ms: Math.round(e.startTime - t0),
                    duration_ms: Math.round(e.duration), response_start_ms: Math.round(e.responseStart - e.startTime)}))""",
                            t0)
    record = {"question": QUESTION, "answer": answer, "page_timings": timings, "requests": entries}
    (artifacts / "one-question-requests.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    assert any(e["url"] == "/v1/chat/completions" for e in entries)


def test_a_reload_reopens_the_conversation_and_the_list_opens_it(page, server, artifacts):
    open_page(page, server)
    turn = ask(page, "Is parking free for visitors?")
    answer = turn.locator(".answer .text").inner_text()
    page.reload()  # the key stays in the tab's session; the conversation is in the URL's fragment
    page.wait_for_selector("body[data-ready=true]")
    sync_api.expect(page.locator("#key-dialog")).to_be_hidden()
    reopened = page.locator(".turn").last
    sync_api.expect(reopened.locator(".question .text")).to_have_text("Is parking free for visitors?")
    assert reopened.locator(".answer .text").inner_text() == answer
    assert reopened.locator(".source-list li").count() >= 1
    page.get_by_role("button", name="New conversation").click()
    assert page.locator(".turn").count() == 0
    entry = page.locator("#conversations .open", has_text="Is parking free for visitors?")
    sync_api.expect(entry).to_have_count(1)
    entry.click()
    sync_api.expect(page.locator(".turn .question .text")).to_have_text(["Is parking free for visitors?"])
    sync_api.expect(entry).to_have_attribute("aria-current", "true")
    page.set_viewport_size({"width": 900, "height": 700})
    page.screenshot(path=str(artifacts / "chat-conversation-list.png"), full_page=True)


def test_feedback_from_the_page_is_stored(page, server):
    base, _, admin = server
    open_page(page, server)
    turn = ask(page, "How long are red wines aged?")
    rid = turn.get_attribute("data-request-id")
    turn.get_by_role("button", name="Bad answer").click()
    status = turn.locator(".feedback-status")
    sync_api.expect(status).to_contain_text("saved")
    turn.get_by_label("Comment").fill("it did not say eighteen months")
    turn.get_by_role("button", name="Send comment").click()
    sync_api.expect(turn.get_by_role("button", name="Bad answer")).to_have_attribute("aria-pressed", "true")
    deadline = time.monotonic() + 30
    while True:  # the click's request may still be in flight when the status text is read
        rows = httpx.get(base + "/v1/feedback", headers={"Authorization": f"Bearer {admin}"}, timeout=10).json()["data"]
        mine = [r for r in rows if r["request_id"] == rid]
        if mine and mine[0]["comment"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert [(r["score"], r["comment"]) for r in mine] == [(-1, "it did not say eighteen months")]
    assert mine[0]["conversation_id"]  # the turn's conversation
    metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {admin}"}, timeout=10).text  # auth on
    assert 'rag_feedback_total{score="down"}' in metrics
