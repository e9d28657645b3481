"""The load-test harness's own logic: workload, statistics, knee, target check, report files.
Its run against the real service is in test_serve_graph.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from load_tests.cli import LoadTestError, check_target
from load_tests.client import Sample, counter_delta
from load_tests.report import cross_check, summarize, write_report
from load_tests.runner import knee, passes
from load_tests.workload import Workload, WorkloadError, load_questions, parse_mix, parse_range

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "msmarco-5k"


def test_questions_from_beir_text_and_demo(tmp_path):
    if SHARED.is_dir():
        qs = load_questions(SHARED, limit=5)
        assert len(qs) == 5 and all(isinstance(q, str) and q for q in qs)
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nfirst question\n\nsecond question\n")
    assert load_questions(txt) == ["first question", "second question"]
    assert len(load_questions(None)) >= 20  # the demo prompts shipped with the harness


def test_bad_questions_files_say_what_is_wrong(tmp_path):
    with pytest.raises(WorkloadError, match="no queries file"):
        load_questions(tmp_path / "missing.jsonl")
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"_id": "1", "text": "ok"}\nnot json\n')
    with pytest.raises(WorkloadError, match=r"q.jsonl:2: not JSON"):
        load_questions(bad)
    bad.write_text('{"_id": "1"}\n')
    with pytest.raises(WorkloadError, match="no 'text'"):
        load_questions(bad)
    empty = tmp_path / "e.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(WorkloadError, match="holds no questions"):
        load_questions(empty)


def test_mix_and_ranges():
    assert parse_mix("chat=1,search=3") == {"chat": 0.25, "search": 0.75}
    assert parse_mix("stream") == {"stream": 1.0}
    for bad, msg in (("chats=1", "unknown request kind"), ("chat=x", "not a number"), ("chat=0", "no request kind"),
                     ("chat=-1", "negative")):
        with pytest.raises(WorkloadError, match=msg):
            parse_mix(bad)
    assert parse_range("64") == (64, 64) and parse_range("16:128") == (16, 128)
    for bad in ("0", "9:3", "a:b"):
        with pytest.raises(WorkloadError):
            parse_range(bad)


def test_workload_is_seeded_and_follows_the_mix():
    qs = [f"question {i}" for i in range(50)]
    mix = parse_mix("chat=1,stream=1,search=1,multiturn=1")
    a = [Workload(qs, mix=mix, max_tokens=(8, 32), seed=7).next() for _ in range(1)]
    w1, w2 = Workload(qs, mix=mix, max_tokens=(8, 32), seed=7), Workload(qs, mix=mix, max_tokens=(8, 32), seed=7)
    r1, r2 = [w1.next() for _ in range(400)], [w2.next() for _ in range(400)]
    assert r1 == r2 and r1[0] == a[0]
    kinds = {k: sum(r.kind == k for r in r1) for k in mix}
    assert all(60 < n < 140 for n in kinds.values()), kinds  # ~100 each
    for r in r1:
        if r.kind == "search":
            assert r.path == "/v1/search" and r.body["query"] in qs
            continue
        assert r.path == "/v1/chat/completions" and 8 <= r.body["max_tokens"] <= 32
        assert r.streamed == (r.kind == "stream")
        assert r.body["messages"][-1]["role"] == "user"
        if r.kind == "multiturn":
            assert [m["role"] for m in r.body["messages"]] == ["user", "assistant", "user"]


def _s(e2e, *, error=None, status=200, ttft=None, tokens=0, kind="chat", stages=None):
    return Sample(kind=kind, start_s=0.0, status=status, error=error, e2e_ms=e2e, ttft_ms=ttft,
                  itl_ms=[10.0, 30.0] if ttft else [], output_tokens=tokens, stages_ms=stages or {})


def test_summary_percentiles_throughput_and_errors():
    samples = [_s(float(ms), tokens=10, ttft=ms / 10, kind="stream", stages={"retriever": 20.0}) for ms in range(1, 101)]
    samples += [_s(5.0, error="http_503", status=503), _s(120_000.0, error="timeout", status=0)]
    s = summarize(samples, window_s=10.0)
    assert s["requests"] == 102 and s["ok"] == 100
    assert s["errors"] == {"503": 1, "timeout": 1}
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert s["ttft_p50_ms"] == pytest.approx(5.05)
    assert s["itl_p50_ms"] == pytest.approx(20.0)
    assert s["throughput_rps"] == 10.0 and s["output_tokens_per_s"] == 100.0
    assert s["error_rate"] == pytest.approx(2 / 102, abs=1e-4)
    assert s["stages_p50_ms"] == {"retriever": 20.0}


def test_knee_is_the_last_carried_step_before_the_first_failure():
    def summ(p95, err=0.0):
        return {"p95_ms": p95, "error_rate": err}

    steps = [(0.5, summ(900)), (1.0, summ(1500)), (2.0, summ(4000)), (4.0, summ(900))]
    assert knee(steps, slo_p95_ms=2000, max_error_rate=0.01) == 1.0  # 4.0 passes, but after a failure
    assert knee([(1.0, summ(100, err=0.05))], 2000, 0.01) is None  # shed load is not carried
    assert not passes({"p95_ms": None, "error_rate": 1.0}, 2000, 0.01)


def test_cross_check_compares_server_counts_with_the_client():
    samples = [_s(10.0, tokens=5), _s(10.0, kind="search"), _s(1.0, error="http_503", status=503)]
    whole = summarize(samples, 1.0)
    before = {'rag_http_requests_total{endpoint=/v1/chat/completions,method=POST,status=200}': 3.0}
    after = {
        'rag_http_requests_total{endpoint=/v1/chat/completions,method=POST,status=200}': 4.0,
        'rag_http_requests_total{endpoint=/v1/search,method=POST,status=200}': 1.0,
        'rag_http_requests_total{endpoint=/v1/chat/completions,method=POST,status=503}': 1.0,
        'rag_generation_tokens_total{kind=completion}': 5.0,
    }
    cc = cross_check(whole, counter_delta(before, after), samples)
    assert cc["available"]
    assert all(r["agree"] for r in cc["rows"].values()), cc
    after['rag_generation_tokens_total{kind=completion}'] = 9.0
    assert not cross_check(whole, counter_delta(before, after), samples)["rows"]["completion tokens"]["agree"]
    assert not cross_check(whole, {}, samples)["available"]


def test_loopback_only_unless_allowed():
    assert check_target("http://127.0.0.1:8000/", False) == "http://127.0.0.1:8000"
    assert check_target("http://localhost:8000", False)
    assert check_target("http://[::1]:8000", False)
    with pytest.raises(LoadTestError, match="--allow-remote"):
        check_target("http://10.1.2.3:8000", False)
    assert check_target("http://10.1.2.3:8000", True)
    with pytest.raises(LoadTestError, match="http"):
        check_target("ftp://127.0.0.1", False)


def test_report_files(tmp_path):
    samples = [_s(float(ms), tokens=10, ttft=ms / 10, kind="stream", stages={"retriever": 20.0, "generator": 50.0})
               for ms in range(1, 30)] + [_s(2.0, error="http_503", status=503)]
    summary = summarize(samples, 5.0)
    report = {**summary, "url": "http://127.0.0.1:8000", "mode": "open", "sweep": False, "knee": None,
              "slo_p95_ms": None, "max_error_rate": 0.01, "started": "now", "machine": "m", "command": "ragraph loadtest",
              "workload": {"source": "x", "questions": 3, "mix": {"stream": 1.0}, "max_tokens": "64"},
              "steps": [{"load": 2.0, "summary": summary}], "by_kind": summary["by_kind"],
              "cross_check": {"available": False, "note": "no scrape"}, "failures": ["chat: http_503"]}
    files = write_report(tmp_path, report, samples)
    names = {f.name for f in files}
    assert {"report.json", "report.md", "latency_vs_load.png", "throughput_vs_load.png", "ttft.png", "stages.png",
            "timeline.png"} <= names
    data = json.loads((tmp_path / "report.json").read_text())
    assert len(data["samples"]) == 30 and data["errors"] == {"503": 1}
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:4] == b"\x89PNG" and f.stat().st_size > 5000
    md = (tmp_path / "report.md").read_text()
    assert "| 2 req/s | 30 | 29 | 503: 1 |" in md and "![ttft](ttft.png)" in md


def test_an_unwritable_out_folder_is_refused_before_the_run(tmp_path, capsys):
    from cli.main import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = main(["loadtest", "--url", "http://127.0.0.1:9", "--out", str(blocker / "run")])
    assert rc == 2
    assert "cannot write the report there" in capsys.readouterr().err


def test_progress_in_a_log_is_a_line_every_few_seconds_not_a_redrawn_bar():
    import io

    from load_tests.cli import _Lines

    out = io.StringIO()
    lines = _Lines(60, "closed 4 users", every_s=3600, out=out)
    for i in range(1000):  # a thousand updates within the interval: one line
        lines.n = i % 60
        lines.set_postfix_str(f"ok {i} errors 0")
    lines.close()
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 2, text
    assert text.splitlines()[-1].endswith("ok 999 errors 0")


def test_serve_sends_library_logs_to_a_file_not_the_console(tmp_path, capsys, monkeypatch):
    import logging
    import warnings

    from serve.launch import quiet_console

    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)  # quiet_console sets it: put back after
    noisy = logging.getLogger("some.library")
    noisy.addHandler(logging.StreamHandler())
    noisy.propagate = False
    loggers = [logging.root, *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    handlers, level = {lg: list(lg.handlers) for lg in loggers}, logging.root.level
    try:
        with warnings.catch_warnings():  # quiet_console changes the warning filters of the process
            log_file = quiet_console(tmp_path / "serve.log")
            noisy.warning("Triton is installed, but doesn't include CPU backend")
            logging.getLogger("ray.serve").info("Started Serve in namespace")
            warnings.warn("a library warning", UserWarning, stacklevel=1)
        captured = capsys.readouterr()
        assert "Triton" not in captured.err + captured.out and "library warning" not in captured.err
        text = log_file.read_text()
        assert "Triton" in text and "a library warning" in text
    finally:
        logging.captureWarnings(False)
        added = {h for lg in handlers for h in lg.handlers} - {h for hs in handlers.values() for h in hs}
        for lg, hs in handlers.items():  # the console handlers it took away, and not its file handler
            lg.handlers[:] = hs
        for h in added:
            h.close()
        logging.root.setLevel(level)
