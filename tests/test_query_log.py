"""The query log (serve/querylog.py, issue 18 item 4): one JSON line per request from the in-process
app (serve/local.py; its engine is never started, so chats answer from the sources) and from the
routes over a pipeline with a hand-written engine (tokens, engine seconds, cost); the question left
out or kept; a slow threshold of 0 logging the whole trace; rotation at max_bytes and by age;
retention of old files."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from deployments.generator import GenDelta
from serve.querylog import QueryLog, process_path
from test_security import chat_body

QUESTION = chat_body()["messages"][0]["content"]


def make_cfg(local_cfg, built_index, tmp_path, **query_log):
    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    data["governor"]["db"] = str(tmp_path / "gov.sqlite3")
    data["governor"]["pricing"] = {"input_per_1k": 0.5, "output_per_1k": 2.0, "currency": "EUR"}
    data["observability"]["query_log"].update({"path": str(tmp_path / "logs" / "queries.jsonl"), **query_log})
    return type(local_cfg).model_validate(data)


def lines_of(tmp_path: Path) -> list[dict]:
    files = sorted((tmp_path / "logs").glob("queries.*.jsonl"))
    assert len(files) == 1, files  # one process: one file, named for it
    assert files[0] == process_path(tmp_path / "logs" / "queries.jsonl")
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def raw_text(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in (tmp_path / "logs").glob("queries.*"))


@pytest.fixture()
def local_app(local_cfg, built_index, tmp_path):
    def start(**query_log):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, **query_log)
        return TestClient(create_app(cfg), client=("127.0.0.1", 50000), base_url="http://localhost"), cfg

    return start


def test_chat_and_search_write_one_line_each_with_the_fields(local_app, tmp_path):
    client, _ = local_app(include_question=False, slow_ms=None)
    r = client.post("/v1/search", json={"query": QUESTION, "top_k": 3})
    assert r.status_code == 200, r.text
    search_docs = [x["document_id"] for x in r.json()["results"]]
    c = client.post("/v1/chat/completions", json=chat_body())
    assert c.status_code == 200, c.text
    chat_docs = [s["document_id"] for s in c.json()["rag"]["sources"]]
    assert client.get("/health").status_code == 200  # probes are not logged
    search, chat = lines_of(tmp_path)

    assert search["endpoint"] == "/v1/search" and search["method"] == "POST" and search["status"] == 200
    assert search["request_id"] == r.headers["x-request-id"]
    assert search["document_ids"] == search_docs and search_docs
    assert search["strategy"] == "hybrid" and "retriever" in search["timings_ms"]
    assert search["key_id"] is None  # auth off

    assert chat["endpoint"] == "/v1/chat/completions" and chat["status"] == 200
    assert chat["request_id"] == c.headers["x-request-id"]
    assert chat["route"] == "rag" and chat["strategy"] in ("hybrid", "lexical", "semantic")
    assert chat["document_ids"] == chat_docs and chat_docs
    assert {"router", "retriever", "total"} <= set(chat["timings_ms"])
    assert chat["tokens"]["total"] == chat["tokens"]["prompt"] + chat["tokens"]["completion"]
    assert chat["cached"] is False and chat["outcome"] in ("ok", "degraded", "sources_only")
    assert "slow" not in chat and "trace" not in chat  # slow_ms null: never a trace
    for line in (search, chat):
        assert "question" not in line
    assert "tasting room" not in raw_text(tmp_path).lower()  # the question is nowhere in the file


def test_include_question_keeps_the_text(local_app, tmp_path):
    client, _ = local_app(include_question=True, slow_ms=None)
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
    assert client.post("/v1/search", json={"query": "cabernet barrels"}).status_code == 200
    chat, search = lines_of(tmp_path)
    assert chat["question"] == QUESTION
    assert search["question"] == "cabernet barrels"


def test_slow_threshold_zero_logs_the_whole_trace_without_the_question(local_app, tmp_path):
    client, _ = local_app(include_question=False, slow_ms=0)
    c = client.post("/v1/chat/completions", json=chat_body())
    assert c.status_code == 200, c.text
    (line,) = lines_of(tmp_path)
    assert line["slow"] is True
    trace = line["trace"]
    meta = c.json()["rag"]["metadata"]
    assert trace["timings_ms"] == meta["timings_ms"] and trace["request_id"] == meta["request_id"]
    assert trace["route"]["kind"] == "rag" and "query" not in trace["route"]  # the router's query is the question's
    assert [s["document_id"] for s in trace["sources"]] == line["document_ids"]
    assert all("relevance_score" in s for s in trace["sources"])
    assert "tasting room" not in raw_text(tmp_path).lower()


def test_a_slow_threshold_above_the_request_logs_no_trace(local_app, tmp_path):
    client, _ = local_app(slow_ms=3_600_000)
    assert client.post("/v1/search", json={"query": QUESTION}).status_code == 200
    (line,) = lines_of(tmp_path)
    assert "trace" not in line and "slow" not in line


def test_a_refused_request_is_logged_with_its_status_and_code(local_app, tmp_path):
    client, _ = local_app()
    r = client.post("/v1/chat/completions", json=chat_body(model="gpt-9"))
    assert r.status_code == 404
    (line,) = lines_of(tmp_path)
    assert line["status"] == 404 and line["error"] == "model_not_found"
    assert line["request_id"] == r.headers["x-request-id"]


def test_logging_off_writes_nothing(local_app, tmp_path):
    client, _ = local_app(enabled=False)
    assert client.post("/v1/search", json={"query": QUESTION}).status_code == 200
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------------------------------------
# with a generator: tokens, engine seconds and cost; a stream is logged at its last byte


class TimedEngine:
    async def generate(self, request):
        for piece in ["The tasting room opens at 10 am [", "1]."]:
            await asyncio.sleep(0)
            yield GenDelta(piece, tokens=4)
        yield GenDelta("", "stop", {"prompt_tokens": 1000, "completion_tokens": 500}, 0, None,
                       {"prefill": 0.25, "decode": 1.5})


@pytest.fixture()
def engine_app(local_cfg, built_index, tmp_path):
    from test_pipeline import pipeline as make_pipeline
    from deployments.retriever import HybridRetriever
    from serve.routes import make_app

    cfg = make_cfg(local_cfg, built_index, tmp_path, slow_ms=None)
    retriever = HybridRetriever.from_config(cfg, index_dir=built_index[1])
    retriever.warm_up()
    app = make_app()
    app.state.pipeline = make_pipeline(cfg, retriever, TimedEngine())
    return TestClient(app, client=("127.0.0.1", 50000), base_url="http://localhost")


@pytest.mark.parametrize("stream", [False, True])
def test_generated_answer_logs_tokens_engine_seconds_and_cost(engine_app, tmp_path, stream):
    r = engine_app.post("/v1/chat/completions", json=chat_body(stream=stream, temperature=0.7))
    assert r.status_code == 200, r.text
    (line,) = lines_of(tmp_path)
    assert line["tokens"] == {"prompt": 1000, "completion": 500, "total": 1500}
    assert line["engine_s"] == {"prefill": 0.25, "decode": 1.5}
    assert line["cost"] == pytest.approx(1000 / 1000 * 0.5 + 500 / 1000 * 2.0)
    assert line["document_ids"] and line["outcome"] == "ok"
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")  # the line was written once the stream had ended


# ---------------------------------------------------------------------------------------------
# the file itself


def test_each_process_has_its_own_file(tmp_path):
    base = tmp_path / "q" / "queries.jsonl"
    a, b = process_path(base, pid=101), process_path(base, pid=202)
    assert a != b and a.parent == b.parent == base.parent
    assert a.name.startswith("queries.") and a.name.endswith(".101.jsonl")
    assert process_path(base).name.endswith(f".{os.getpid()}.jsonl")


def test_the_file_rotates_at_max_bytes(local_cfg, tmp_path):
    q = local_cfg.observability.query_log.model_copy(update={
        "path": tmp_path / "q" / "queries.jsonl", "max_bytes": 2048, "backups": 2})
    log = QueryLog(q, pid=7)
    try:
        for i in range(100):
            log.write({"request_id": f"r{i:03d}", "pad": "x" * 100})
    finally:
        log.close()
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert files == [log.path.name, log.path.name + ".1", log.path.name + ".2"]
    for name in files:
        p = tmp_path / "q" / name
        assert p.stat().st_size <= 2048
        assert p.stat().st_mode & 0o077 == 0  # 0600: with questions on, the file holds what users asked
        for line in p.read_text().splitlines():
            json.loads(line)
    newest = [json.loads(x)["request_id"] for x in log.path.read_text().splitlines()]
    assert newest[-1] == "r099"  # the current file has the latest lines; older ones were rotated out


def test_the_file_rotates_by_age_too(local_cfg, tmp_path, monkeypatch):
    import time
    from types import SimpleNamespace

    import serve.querylog

    q = local_cfg.observability.query_log.model_copy(update={
        "path": tmp_path / "q" / "queries.jsonl", "max_age_hours": 24, "backups": 2})
    log = QueryLog(q, pid=7)
    try:
        log.write({"request_id": "old"})
        log.write({"request_id": "same-day"})  # a file younger than max_age_hours is not rotated
        tomorrow = time.time() + 25 * 3600
        monkeypatch.setattr(serve.querylog, "time", SimpleNamespace(time=lambda: tomorrow), raising=False)
        log.write({"request_id": "new"})
    finally:
        log.close()
    rotated = log.path.with_name(log.path.name + ".1")
    assert [json.loads(x)["request_id"] for x in rotated.read_text().splitlines()] == ["old", "same-day"]
    assert [json.loads(x)["request_id"] for x in log.path.read_text().splitlines()] == ["new"]
    assert rotated.stat().st_mode & 0o077 == 0


def test_log_files_past_retention_days_are_deleted_except_a_live_process_file(local_cfg, tmp_path):
    import socket
    import subprocess
    import time

    folder = tmp_path / "q"
    folder.mkdir()
    here = socket.gethostname()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        names = {"rotated": f"queries.{here}.7.jsonl.3", "other host": "queries.pod-a.12.jsonl",
                 "gone": f"queries.{here}.999999999.jsonl", "alive": f"queries.{here}.{alive.pid}.jsonl",
                 "recent": f"queries.{here}.7.jsonl.1", "not ours": "notes.txt"}
        for name in names.values():
            (folder / name).write_text("{}\n")
        forty_days_ago = time.time() - 40 * 86400
        for what in ("rotated", "other host", "gone", "alive", "not ours"):
            os.utime(folder / names[what], (forty_days_ago, forty_days_ago))
        q = local_cfg.observability.query_log.model_copy(update={"path": folder / "queries.jsonl",
                                                                  "retention_days": 30})
        QueryLog(q, pid=7).close()
    finally:
        alive.kill()
        alive.wait()
    assert sorted(p.name for p in folder.iterdir()) == sorted(names[w] for w in ("alive", "recent", "not ours"))
