"""Files that would take a parser far too long or too much memory, and jobs over their limits:
the caps of indexing/formats.py (HTML elements and depth, PDF content-stream bytes per page and per
file, rows per JSONL/Parquet file) and the ingest job's wall-clock and memory limits (its files read
in a child process it kills, deployments/ingest.py). No Ray: the jobs run with the thread runner."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from deployments.ingest import IngestService
from indexing.documents import SourceError
from indexing.formats import Limits, html_text, read_upload
from test_documents_api import pdf_file

ROOT = Path(__file__).resolve().parents[1]
TEXTLESS = b"BT /F1 1 Tf () Tj ET\n"  # a text operator that draws nothing: the extractor parses it all


def shared_stream_pdf(pages: int, stream: bytes) -> bytes:
    """A PDF of ``pages`` pages that all draw one Flate-compressed content stream (object 3)."""
    data = zlib.compress(stream, 9)
    kids = " ".join(f"{4 + i} 0 R" for i in range(pages))
    font = b"/Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>".encode(),
            b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream"]
    objs += [b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R " + font + b" >>"] * pages
    return pdf_file(objs)


def read_in_child(tmp_path: Path, name: str, data: bytes, timeout_s: float = 20) -> dict:
    """read_upload of one file with the default limits, in a child process killed after
    ``timeout_s`` (so that a parser that would run for hours fails the test instead of hanging it):
    ``{"error": message or None, "seconds": ...}``."""
    path = tmp_path / name
    path.write_bytes(data)
    code = f"""
import json, time
from indexing.documents import SourceError
from indexing.formats import read_upload
data = open({str(path)!r}, "rb").read()
t = time.perf_counter()
try:
    list(read_upload({name!r}, data, domain="d"))
    error = None
except SourceError as e:
    error = str(e)
print(json.dumps({{"error": error, "seconds": time.perf_counter() - t}}))
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {name} ({len(data)} bytes) ran for over {timeout_s:g} s")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ---------------------------------------------------------------------------------------------
# the parsers' caps


def test_64_kb_of_nested_html_is_refused_at_once_naming_the_depth_limit(tmp_path):
    """5800 nested divs (64 kB) took the reader 138 s; over documents.max_html_depth they are
    refused before the page is read."""
    page = b"<div>" * 5800 + b"x" + b"</div>" * 5800
    got = read_in_child(tmp_path, "nested.html", page)
    assert got["error"] is not None and got["error"].startswith("nested.html: elements nested 257 deep"), got
    assert "the limit is 256 (documents.max_html_depth)" in got["error"]


def test_html_over_the_element_limit_is_refused_and_a_page_within_it_reads_as_before():
    page = b"<html><body>" + b"<p>word</p>" * 50 + b"</body></html>"
    with pytest.raises(SourceError, match=r"many\.html: over 40 HTML elements; the limit is 40 "
                                          r"\(documents\.max_html_elements\)"):
        html_text(page, name="many.html", limits=Limits(max_html_elements=40))
    with pytest.raises(SourceError, match=r"deep\.html: elements nested 5 deep; the limit is 4"):
        html_text(b"<div><div><p>x</p></div></div>", name="deep.html", limits=Limits(max_html_depth=4))
    title, text = html_text(page, limits=Limits(max_html_elements=60))
    assert text == "\n\n".join(["word"] * 50)
    # nested blocks are read with their parent, table rows on their own, dropped parts stay dropped
    nested = (b"<main><ul><li>one<ul><li>two</li></ul></li></ul><div hidden><p>gone</p></div>"
              b"<li>cell<table><tr><td>a</td><td>b</td></tr></table></li><nav><p>menu</p></nav></main>")
    assert html_text(nested)[1] == "- one two\n\n- cell a b\n\na | b"


def test_a_2000_page_pdf_sharing_one_content_stream_is_refused_at_once(tmp_path):
    """Every page draws the same 3 MB stream of text operators that draw nothing: about 10 s of
    extraction per page, 6 hours for the file; refused before any text is extracted."""
    pdf = shared_stream_pdf(2000, TEXTLESS * 150_000)
    got = read_in_child(tmp_path, "shared.pdf", pdf)
    assert got["error"] is not None, got
    assert got["error"].startswith("shared.pdf: over 33554432 bytes of content streams by page 11"), got
    assert "(documents.max_pdf_content_bytes)" in got["error"]


def test_a_pdf_page_over_the_content_limit_is_refused(tmp_path):
    pdf = shared_stream_pdf(1, TEXTLESS * 250_000)  # 5.25 MB on one page
    got = read_in_child(tmp_path, "page.pdf", pdf)
    assert got["error"] == ("page.pdf: page 1 has 5250000 bytes of content streams; the limit is 4194304 per page "
                            "(documents.max_pdf_page_content_bytes)"), got


def test_rows_per_jsonl_and_parquet_file_are_capped():
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = "".join(json.dumps({"id": str(i), "text": f"row {i}"}) + "\n" for i in range(4)).encode()
    assert len(list(read_upload("rows.jsonl", rows, domain="d", limits=Limits(max_rows=4)))) == 4
    with pytest.raises(SourceError, match=r"rows\.jsonl: 4 rows; the limit is 3 rows per file "
                                          r"\(documents\.max_rows_per_file\)"):
        list(read_upload("rows.jsonl", rows, domain="d", limits=Limits(max_rows=3)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(4)], "text": [f"row {i}" for i in range(4)]}), buf)
    assert len(list(read_upload("t.parquet", buf.getvalue(), domain="d", limits=Limits(max_rows=4)))) == 4
    with pytest.raises(SourceError, match=r"t\.parquet: 4 rows; the limit is 3 rows per file"):
        list(read_upload("t.parquet", buf.getvalue(), domain="d", limits=Limits(max_rows=3)))


def test_the_caps_are_config_values_with_clear_errors(local_cfg):
    from pydantic import ValidationError

    d = local_cfg.documents
    limits = Limits.from_config(d.model_copy(update={"max_html_depth": 7, "max_rows_per_file": 9}))
    assert (limits.max_html_depth, limits.max_rows, limits.max_pdf_content_bytes) == (7, 9, d.max_pdf_content_bytes)
    for key, bad in [("max_html_depth", 0), ("job_timeout_s", 0), ("job_memory_mb", 100)]:
        with pytest.raises(ValidationError, match=key):
            type(d).model_validate({**d.model_dump(), key: bad})


# ---------------------------------------------------------------------------------------------
# a job's wall-clock and memory limits


def _service(local_cfg, built_index, tmp_path, **documents):
    import shutil

    root = tmp_path / "index"
    shutil.copytree(built_index[1], root)
    cfg = local_cfg.model_copy(update={
        "indexing": local_cfg.indexing.model_copy(update={"dir": root}),
        "governor": local_cfg.governor.model_copy(update={"db": tmp_path / "state" / "gov.sqlite3"}),
        "documents": local_cfg.documents.model_copy(update=documents),
    })
    return IngestService(cfg, runner="thread")


def test_a_job_over_its_time_is_killed_failed_with_the_reason_and_the_next_job_runs(local_cfg, built_index, tmp_path):
    """The first job's PDF is within every cap but takes minutes to read (8 pages drawing one 3.5 MB
    stream); with documents.job_timeout_s 5 its reader is killed, the job fails once (not run
    again), and the job queued behind it publishes."""
    svc = _service(local_cfg, built_index, tmp_path, job_timeout_s=5, max_attempts=2)
    svc.submit("job_warm", "upsert", files=[("warm.md", b"# Warm\n\nThe reader is started by this job.")])
    assert svc.run_once() and svc.job("job_warm")["status"] == "succeeded"  # the reader's forkserver is up
    slow = shared_stream_pdf(8, TEXTLESS * 170_000)
    svc.submit("job_slow", "upsert", files=[("slow.pdf", slow)])
    svc.submit("job_next", "upsert", [{"id": "after", "title": "", "metadata": {},
                                       "text": "The cellar is swept every Friday after the last tasting."}])
    t = time.monotonic()
    assert svc.run_once()
    took = time.monotonic() - t
    job = svc.job("job_slow")
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"] == ("took longer than documents.job_timeout_s (5 s) while reading slow.pdf; "
                            "nothing was published"), job
    assert took < 60, took  # killed at its limit, not read to the end (minutes)
    assert svc.run_once()
    nxt = svc.job("job_next")
    assert nxt["status"] == "succeeded" and nxt["result"]["added"] == ["after"], nxt
    assert not svc.run_once()  # the slow job is not queued again
    assert svc.job("job_slow")["status"] == "failed"


def test_a_file_over_the_memory_limit_fails_alone(local_cfg, built_index, tmp_path):
    """A 40 kB Parquet file of 4000 dictionary-encoded rows unpacks to 1.2 GB of text: its reader
    runs out of documents.job_memory_mb, that file fails with the reason, the job's other file goes in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array([0] * 4000, pa.int32()), pa.array(["w " * 150_000]))
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [str(i) for i in range(4000)], "text": text}), buf)
    svc = _service(local_cfg, built_index, tmp_path, job_memory_mb=640, max_document_chars=100_000)
    svc.submit("job_mem", "upsert", files=[("bomb.parquet", buf.getvalue()),
                                           ("fine.md", b"# Fine\n\nThe press house opens at eight.")])
    assert svc.run_once()
    job = svc.job("job_mem")
    assert job["status"] == "succeeded" and job["result"]["added"] == ["fine.md"], job
    assert job["failures"] == [{"file": "bomb.parquet", "reason": "bomb.parquet: reading it needed more memory than "
                                "documents.job_memory_mb (640 MiB) allows"}], job


def test_an_embedding_past_the_time_limit_stops_before_publishing(local_cfg, built_index, tmp_path, monkeypatch):
    """The deadline also holds after the files are read: an embedding that runs past
    documents.job_timeout_s stops at its next report, and nothing is published."""
    import indexing.jobs
    from indexing.store import current_name

    real = indexing.jobs.embed_fn

    def slow_embed_fn(cfg, embedder, **kw):
        embed = real(cfg, embedder, **kw)

        def slow(texts):
            time.sleep(1.5)
            return embed(texts)

        return slow

    monkeypatch.setattr(indexing.jobs, "embed_fn", slow_embed_fn)
    svc = _service(local_cfg, built_index, tmp_path, job_timeout_s=1)
    before = current_name(svc.cfg.indexing.dir)
    svc.submit("job_embed", "upsert", [{"id": "late", "title": "", "metadata": {},
                                        "text": "Late harvest grapes are picked in November."}])
    assert svc.run_once()
    job = svc.job("job_embed")
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"] == "took longer than documents.job_timeout_s (1 s); nothing was published", job
    assert current_name(svc.cfg.indexing.dir) == before and not svc.run_once()


def test_a_ray_task_past_the_time_limit_is_cancelled(local_cfg, tmp_path, monkeypatch):
    """With the Ray runner, a build task that has not answered by documents.job_timeout_s (plus a
    grace for the task's own deadline) is killed with ray.cancel(force=True) and the job fails with
    the reason. Ray itself is stood in for: what is checked is the runner's waiting."""
    import types

    import deployments.ingest as ingest

    calls = {"wait": 0, "cancel": []}

    def wait(refs, timeout):
        calls["wait"] += 1
        if calls["wait"] > 100:
            raise RuntimeError("the task was never cancelled")
        time.sleep(min(timeout, 0.05))
        return [], refs

    task = types.SimpleNamespace(remote=lambda cfg, payload: ("ref", payload.get("timeout_s")))
    fake = types.SimpleNamespace(remote=lambda fn: types.SimpleNamespace(options=lambda **kw: task), wait=wait,
                                 cancel=lambda ref, force: calls["cancel"].append((ref, force)),
                                 get=lambda ref: pytest.fail("nothing to get"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ingest, "_CANCEL_GRACE_S", 0.2, raising=False)
    cfg = local_cfg.model_copy(update={
        "governor": local_cfg.governor.model_copy(update={"db": tmp_path / "gov.sqlite3"}),
        "documents": local_cfg.documents.model_copy(update={"job_timeout_s": 0.3}),
    })
    svc = IngestService(cfg, runner="ray")
    svc.submit("job_ray", "delete", deletes=["anything"])
    assert svc.run_once()
    job = svc.job("job_ray")
    assert calls["cancel"] == [(("ref", 0.3), True)], calls
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["error"].startswith("took longer than documents.job_timeout_s (0.3 s); its Ray task was cancelled"), job


def test_the_reader_dies_with_the_process_that_runs_the_job(tmp_path):
    """A job's process killed outright (SIGKILL, as by `ray stop --force`) leaves no reader behind
    still parsing its file (nor its forkserver, which lives while a child of it does): the reader
    ends when the job's end of its pipe closes."""
    import os
    import signal

    import psutil

    (tmp_path / "slow.pdf").write_bytes(shared_stream_pdf(8, TEXTLESS * 170_000))
    code = f"""
import multiprocessing, threading, time
from deployments.ingest import read_files
from indexing.formats import Limits
if __name__ == "__main__":
    data = open({str(tmp_path / "slow.pdf")!r}, "rb").read()
    def started(line):  # the reader has the file: it is parsing it now
        time.sleep(0.5)
        print(multiprocessing.active_children()[0].pid, flush=True)
    threading.Thread(target=read_files, args=([("slow.pdf", data)],), daemon=True,
                     kwargs=dict(domain="d", limits=Limits(), memory_mb=1024, deadline=time.monotonic() + 120,
                                 timeout_s=120, log=started)).start()
    time.sleep(120)
"""
    job = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = job.stdout.readline()
        assert line.strip().isdigit(), f"no reader process started: {line!r}"
        reader = psutil.Process(int(line))
        assert reader.status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait(10)

    def gone() -> bool:
        try:
            return reader.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    end = time.monotonic() + 15
    while not gone() and time.monotonic() < end:
        time.sleep(0.1)
    assert gone(), f"the reader {reader.pid} still runs after its job's process was killed"
