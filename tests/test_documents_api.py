"""The documents API, ingest jobs and index operations without Ray: the in-process app
(serve/local.py: the same routes and admission as the Serve ingress; its jobs run in a thread of
this process) over a copy of the session's index, with the real embedder. The engine is not
started, so nothing here generates; the same flow against the graph, under load and with the
ingress killed, is in test_documents_graph.py (slow)."""

from __future__ import annotations

import io
import json
import shutil
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from deployments.ingest import IngestService, spool_dir
from indexing.documents import SourceError
from indexing.formats import Limits, docx_text, html_text, pdf_text, read_upload
from indexing.store import current_name, list_versions
from state.db import Database, open_database, sqlite_url
from state.jobs import SqlJobs
from state.keys import SqlKeys

LOCAL = {"client": ("127.0.0.1", 50000), "base_url": "http://127.0.0.1"}  # auth off: loopback callers are admins


# ---------------------------------------------------------------------------------------------
# fixtures: files made here with the libraries (or by hand: a PDF with one text line per page)


def make_pdf(pages: list[str], title: str | None = None) -> bytes:
    """A minimal valid PDF, one line of Helvetica text per page (written by hand: no PDF writer
    that draws text is installed)."""
    objs: list[bytes] = []
    n_pages = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n_pages))
    font = 3 + 2 * n_pages
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    for i, text in enumerate(pages):
        safe = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({safe}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
                    f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    info = None
    if title:
        objs.append(f"<< /Title ({title}) >>".encode())
        info = len(objs)
    return pdf_file(objs, f" /Info {info} 0 R" if info else "")


def pdf_file(objs: list[bytes], trailer_extra: str = "") -> bytes:
    """``objs`` (object 1 the catalog) as a PDF file: header, numbered objects, xref table, trailer."""
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(out.tell())
        out.write(f"{n} 0 obj\n".encode() + body + b"\nendobj\n")
    xref = out.tell()
    out.write(f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode())
    out.write("".join(f"{off:010d} 00000 n \n" for off in offsets).encode())
    out.write(f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R{trailer_extra} >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def make_docx(title: str, sections: list[tuple[str, str]], table: list[list[str]] | None = None) -> bytes:
    import docx

    d = docx.Document()
    d.add_heading(title, level=0)
    for heading, text in sections:
        d.add_heading(heading, level=1)
        d.add_paragraph(text)
    if table:
        t = d.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, cell in enumerate(row):
                t.cell(r, c).text = cell
    buf = io.BytesIO()
    d.save(buf)
    return buf.getvalue()


HTML = b"""<!doctype html><html><head><title>Harvest festival</title><script>var tracking = "zzscriptzz";</script>
<style>.x { color: red }</style></head><body>
<nav><a href="/">Home</a> <a href="/shop">zznavzz menu</a></nav>
<header>zzheaderzz banner</header>
<main><h1>Harvest festival</h1><p>The harvest festival takes place every September in the lower vineyard, with
grape stomping and a barrel tasting.</p><h2>Tickets</h2><p>Tickets cost twenty euros and include a souvenir glass.</p>
<div style="display:none">zzhiddenzz</div></main>
<aside>zzasidezz related links</aside><footer>zzfooterzz copyright</footer></body></html>"""


# ---------------------------------------------------------------------------------------------
# the service


@pytest.fixture()
def service(local_cfg, built_index, tmp_path):
    """(client, cfg, index root): the in-process app over a copy of the session's index, with its own
    state database (keys, jobs); ``**overrides`` per section."""
    apps = []

    def start(auth: bool = False, **sections):
        root = tmp_path / "index"
        if not root.exists():
            shutil.copytree(built_index[1], root)
        data = local_cfg.model_dump()
        data["indexing"]["dir"] = str(root)
        data["governor"]["db"] = str(tmp_path / "state" / "gov.sqlite3")
        data["governor"]["auth"]["enabled"] = auth
        for section, values in sections.items():
            data[section].update(values)
        cfg = type(local_cfg).model_validate(data)
        from serve.local import create_app

        app = create_app(cfg)
        apps.append(app)
        return TestClient(app, **LOCAL), cfg, root

    yield start
    for app in apps:
        app.state.pipeline.stop()  # its job runner (started by the first documents call)


def wait_job(client, job_id: str, *, headers=None, deadline_s: float = 300) -> dict:
    """Poll a job until it ends (the deadline only stops a hung test; no duration is asserted)."""
    end = time.monotonic() + deadline_s
    while True:
        r = client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in ("succeeded", "failed"):
            return job
        assert time.monotonic() < end, f"job {job_id} still {job['status']}: {job}"
        time.sleep(0.2)


def search_ids(client, query: str, **kw) -> list[str]:
    r = client.post("/v1/search", json={"query": query, "top_k": 5, **kw})
    assert r.status_code == 200, r.text
    return [x["document_id"] for x in r.json()["results"]]


def assert_error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    return err["message"]


# ---------------------------------------------------------------------------------------------
# upload, job, search, list, delete


def test_json_upload_goes_live_and_delete_removes_it(service):
    client, cfg, root = service()
    before = current_name(root)
    doc = {"id": "cellar-door", "title": "Cellar door", "metadata": {"domain": "visiting"},
           "text": "# Cellar door\n\nThe underground cellar door is painted turquoise and opens onto the "
                   "fermentation hall where the amphorae rest."}
    r = client.post("/v1/documents", json={"documents": [doc]})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    assert r.headers["Location"] == f"/v1/jobs/{job_id}"
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded" and job["failures"] == [] and job["error"] is None, job
    res = job["result"]
    assert res["published"] and res["previous"] == before and res["added"] == ["cellar-door"], res
    # incremental: only the new document's chunks were embedded, the rest reused
    assert res["embedded"] == 1 and res["reused"] == res["chunks"] - 1, res
    assert current_name(root) == res["version"] != before
    assert search_ids(client, "turquoise cellar door amphorae")[0] == "cellar-door"
    listed = client.get("/v1/documents", params={"limit": 100}).json()
    row = next(d for d in listed["data"] if d["id"] == "cellar-door")
    assert row["title"] == "Cellar door" and row["chunks"] == 1 and row["domain"] == "visiting" and row["uploaded"]
    assert listed["version"] == res["version"] and listed["total"] == 7

    r = client.delete("/v1/documents/cellar-door")
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded" and job["result"]["removed"] == ["cellar-door"], job
    assert "cellar-door" not in search_ids(client, "turquoise cellar door amphorae")
    assert "cellar-door" not in [d["id"] for d in client.get("/v1/documents").json()["data"]]
    # the other documents are intact; a source document can be deleted by its id (with a slash)
    assert search_ids(client, "tasting room opening hours")[0] == "visiting/hours.md"
    job = wait_job(client, client.delete("/v1/documents/visiting/hours.md").json()["job_id"])
    assert job["status"] == "succeeded" and job["result"]["removed"] == ["visiting/hours.md"], job
    assert_error(client.delete("/v1/documents/visiting/hours.md"), 404, "document_not_found")
    jobs = client.get("/v1/jobs").json()["data"]
    assert [j["kind"] for j in jobs[:3]] == ["delete", "delete", "upsert"]


def test_the_same_upload_twice_publishes_nothing_the_second_time(service):
    client, _, root = service()
    doc = {"id": "again", "text": "Sparkling wine is riddled by hand for six weeks before disgorging."}
    first = wait_job(client, client.post("/v1/documents", json={"documents": [doc]}).json()["job_id"])
    second = wait_job(client, client.post("/v1/documents", json={"documents": [doc]}).json()["job_id"])
    assert first["result"]["published"] and not second["result"]["published"], second
    assert second["result"]["version"] == first["result"]["version"] == current_name(root)
    assert second["result"]["embedded"] == 0


def test_formats_html_pdf_docx_go_in_with_their_headings_and_a_bad_file_fails_alone(service):
    client, _, _ = service()
    files = [
        ("files", ("festival.html", HTML, "text/html")),
        ("files", ("barrels.pdf", make_pdf(["Oak barrels are toasted over open fire by the cooper.",
                                            "Each barrel holds two hundred and twenty five litres of wine."],
                                           title="Barrel guide"), "application/pdf")),
        ("files", ("pruning.docx", make_docx("Pruning handbook", [
            ("Winter pruning", "Vines are cane pruned in January when the sap is down."),
            ("Green harvest", "Surplus bunches are dropped in July to concentrate flavour.")],
            table=[["Month", "Task"], ["January", "pruning"]]), "application/vnd.openxmlformats-officedocument."
            "wordprocessingml.document")),
        ("files", ("broken.pdf", b"%PDF-1.4 this is not really a pdf", "application/pdf")),
        ("files", ("notes.md", b"# Notes\n\nThe cooperage visit starts at noon.", "text/markdown")),
    ]
    r = client.post("/v1/documents", files=files, data={"domain": "library"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert [f["file"] for f in job["failures"]] == ["broken.pdf"] and "broken.pdf" in job["failures"][0]["reason"]
    assert sorted(job["result"]["added"]) == ["barrels.pdf", "festival.html", "notes.md", "pruning.docx"]

    def top(query: str) -> dict:
        r = client.post("/v1/search", json={"query": query, "top_k": 3})
        return r.json()["results"][0]

    pdf = top("two hundred and twenty five litres barrel")
    assert pdf["document_id"] == "barrels.pdf" and pdf["heading_path"] == "Page 2" and pdf["title"] == "Barrel guide"
    doc = top("cane pruned in January sap")
    assert doc["document_id"] == "pruning.docx" and doc["heading_path"].endswith("Winter pruning"), doc
    html = top("harvest festival grape stomping")
    assert html["document_id"] == "festival.html" and html["title"] == "Harvest festival" and html["domain"] == "library"
    tickets = top("tickets twenty euros souvenir glass")
    assert tickets["document_id"] == "festival.html" and tickets["heading_path"] == "Harvest festival > Tickets"
    text = " ".join(x["text"] for x in client.post("/v1/search", json={"query": "festival", "top_k": 10}).json()["results"])
    for junk in ("zzscriptzz", "zznavzz", "zzheaderzz", "zzhiddenzz", "zzasidezz", "zzfooterzz"):
        assert junk not in text


def test_a_job_whose_every_document_failed_publishes_nothing(service):
    client, _, root = service()
    before = current_name(root)
    versions = [v["name"] for v in list_versions(root)[1]]
    files = [("files", ("a.pdf", b"not a pdf", "application/pdf")), ("files", ("b.docx", b"not a zip", "x/y")),
             ("files", ("c.txt", b"\xff\xfe\x00bad utf8 \xff", "text/plain"))]
    job = wait_job(client, client.post("/v1/documents", files=files).json()["job_id"])
    assert job["status"] == "failed" and "every document failed (3)" in job["error"], job
    assert sorted(f["file"] for f in job["failures"]) == ["a.pdf", "b.docx", "c.txt"]
    assert job["result"] is None
    assert current_name(root) == before and [v["name"] for v in list_versions(root)[1]] == versions


# ---------------------------------------------------------------------------------------------
# limits and bad input


def test_limits_and_bad_input_are_refused_naming_the_limit(service):
    client, cfg, _ = service(documents={"max_upload_bytes": 4096, "max_files": 2, "max_documents": 3})
    big = {"documents": [{"id": "big", "text": "word " * 2000}]}
    msg = assert_error(client.post("/v1/documents", json=big), 413, "request_too_large")
    assert "documents.max_upload_bytes" in msg and "4096" in msg
    files = [("files", (f"f{i}.txt", b"hello", "text/plain")) for i in range(3)]
    msg = assert_error(client.post("/v1/documents", files=files), 413, "too_many_files")
    assert "documents.max_files" in msg
    many = {"documents": [{"id": str(i), "text": "x"} for i in range(4)]}
    assert "documents.max_documents" in assert_error(client.post("/v1/documents", json=many), 413, "too_many_documents")
    msg = assert_error(client.post("/v1/documents", files=[("files", ("tool.exe", b"MZ", "application/octet-stream"))]),
                       415, "unsupported_file_type")
    assert "tool.exe" in msg and ".pdf" in msg
    assert_error(client.post("/v1/documents", content=b"id,text", headers={"content-type": "text/csv"}), 415,
                 "unsupported_media_type")
    dup = {"documents": [{"id": "a", "text": "one"}, {"id": "b", "text": "two"}, {"id": "a", "text": "three"}]}
    msg = assert_error(client.post("/v1/documents", json=dup), 400, "duplicate_document_ids")
    assert "['a']" in msg
    files = [("files", ("x.md", b"one", "text/markdown")), ("files", ("dir/x.md", b"two", "text/markdown"))]
    assert "x.md" in assert_error(client.post("/v1/documents", files=files), 400, "duplicate_document_ids")
    bad_meta = {"documents": [{"id": "m", "text": "t", "metadata": {"author": "me"}}]}
    assert "author" in assert_error(client.post("/v1/documents", json=bad_meta), 400, "invalid_value")
    assert_error(client.post("/v1/documents", json={"documents": [{"id": "e", "text": "  "}]}), 400, "invalid_value")
    assert_error(client.post("/v1/documents", json={"docs": []}), 400, "invalid_value")
    assert_error(client.delete("/v1/documents/never-was"), 404, "document_not_found")
    assert_error(client.get("/v1/jobs/job_nope"), 404, "job_not_found")
    assert_error(client.get("/v1/jobs", params={"status": "done"}), 400, "invalid_value")
    assert client.get("/v1/jobs").json()["data"] == []  # nothing refused was queued


def test_the_documents_api_is_admin_only(service, tmp_path):
    client, cfg, _ = service(auth=True)
    keys = SqlKeys(open_database(cfg))
    user, _ = keys.create("reader")
    admin, _ = keys.create("operator", scope="admin")
    doc = {"documents": [{"id": "k", "text": "Keys guard the upload endpoint of the service."}]}
    for method, path, kw in [("post", "/v1/documents", {"json": doc}), ("get", "/v1/documents", {}),
                             ("delete", "/v1/documents/k", {}), ("get", "/v1/jobs", {}), ("get", "/v1/jobs/j", {}),
                             ("get", "/v1/index", {}), ("post", "/v1/index/rollback", {"json": {"version": "v"}})]:
        assert_error(getattr(client, method)(path, headers={"Authorization": f"Bearer {user}"}, **kw), 403,
                     "insufficient_scope")
        assert_error(getattr(client, method)(path, **kw), 401, "missing_api_key")
    r = client.post("/v1/documents", json=doc, headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job_id"], headers={"Authorization": f"Bearer {admin}"})
    assert job["status"] == "succeeded", job


# ---------------------------------------------------------------------------------------------
# index operations


def test_index_lists_versions_and_rollback_is_atomic_and_refuses_another_embedder(service):
    client, cfg, root = service()
    first = current_name(root)
    doc = {"id": "rollback-me", "text": "The vintage of the flood year was bottled in magnums only."}
    job = wait_job(client, client.post("/v1/documents", json={"documents": [doc]}).json()["job_id"])
    second = job["result"]["version"]
    info = client.get("/v1/index").json()
    assert info["live"] == second and info["documents"] == 7
    names = [v["name"] for v in info["versions"]]
    assert names[:2] == [second, first] and info["versions"][1]["rollback"] and not info["versions"][0]["rollback"]
    assert info["embedder"]["name"] == "all-MiniLM-L6-v2" and "/" not in info["versions"][0]["model"]["name"]
    assert search_ids(client, "flood year vintage magnums")[0] == "rollback-me"

    r = client.post("/v1/index/rollback", json={"version": first})
    assert r.status_code == 200 and r.json() == {"object": "index.rollback", "previous": second, "live": first,
                                                 "changed": True}, r.text
    assert current_name(root) == first and "rollback-me" not in search_ids(client, "flood year vintage magnums")
    assert "rollback-me" not in [d["id"] for d in client.get("/v1/documents").json()["data"]]
    assert_error(client.post("/v1/index/rollback", json={"version": "v19990101-000000-000000"}), 404,
                 "version_not_found")
    assert_error(client.post("/v1/index/rollback", json={"version": "../../etc"}), 404, "version_not_found")

    # a version embedded by another model is refused, and nothing changes
    manifest = root / "versions" / second / "manifest.json"
    m = json.loads(manifest.read_text())
    m["model"]["checksum"] = "0" * 64
    manifest.write_text(json.dumps(m))
    msg = assert_error(client.post("/v1/index/rollback", json={"version": second}), 409, "embedder_mismatch")
    assert second in msg and str(root) not in msg
    assert current_name(root) == first
    assert next(v for v in client.get("/v1/index").json()["versions"] if v["name"] == second)["same_embedder"] is False


def test_cli_index_versions_and_rollback(service, capsys, tmp_path):
    from cli.main import main as cli

    client, cfg, root = service()
    first = current_name(root)
    job = wait_job(client, client.post("/v1/documents", json={"documents": [{"id": "cli", "text": "Corks."}]}).json()["job_id"])
    second = job["result"]["version"]
    cfg_file = tmp_path / "cfg.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli(["--config", str(cfg_file), "index", "versions"]) == 0
    out = capsys.readouterr().out
    assert f"* {second}" in out and f"  {first}" in out and "same as the config" in out
    assert cli(["--config", str(cfg_file), "index", "rollback", first]) == 0
    assert f"{first} is live (was {second})" in capsys.readouterr().out and current_name(root) == first
    assert cli(["--config", str(cfg_file), "index", "rollback", "nope"]) == 1
    assert "no index version 'nope'" in capsys.readouterr().err
    assert cli(["--config", str(cfg_file), "index", "rollback"]) == 2
    assert current_name(root) == first


# ---------------------------------------------------------------------------------------------
# durability: a job survives its runner


def test_a_job_interrupted_by_a_restart_is_run_again_and_publishes_once(local_cfg, built_index, tmp_path):
    root = tmp_path / "index"
    shutil.copytree(built_index[1], root)
    cfg = local_cfg.model_copy(update={
        "indexing": local_cfg.indexing.model_copy(update={"dir": root}),
        "governor": local_cfg.governor.model_copy(update={"db": tmp_path / "state" / "gov.sqlite3"}),
    })
    before = current_name(root)
    a = IngestService(cfg, runner="thread")  # never started: it "crashes" holding the job
    a.submit("job_a", "upsert", [{"id": "durable", "title": "", "text": "Barrels are topped up every week.",
                                  "metadata": {}}])
    assert a.store.claim("dead-runner")["status"] == "running"
    db, spool = cfg.governor.db, spool_dir(cfg)  # the state database (state.url unset: the SQLite file) and the spool
    assert (spool / "job_a").is_dir() and db.stat().st_mode & 0o777 == 0o600 and spool.stat().st_mode & 0o777 == 0o700

    b = IngestService(cfg, runner="thread")  # the next start: same database, a new runner
    assert b.recover() == ["job_a"]
    job = b.job("job_a")
    assert job["status"] == "queued" and job["attempts"] == 1 and "interrupted" in job["progress"]["message"]
    assert b.run_once()
    job = b.job("job_a")
    assert job["status"] == "succeeded" and job["attempts"] == 2 and job["result"]["added"] == ["durable"], job
    assert not (spool / "job_a").exists()
    published = current_name(root)
    assert published != before

    # interrupted after it published: the next run finds its changes live and publishes nothing more
    b.submit("job_b", "upsert", [{"id": "durable", "title": "", "text": "Barrels are topped up every week.",
                                  "metadata": {}}])
    b.store.claim("another-dead-runner")
    c = IngestService(cfg, runner="thread")
    assert c.recover() == ["job_b"] and c.run_once()
    job = c.job("job_b")
    assert job["status"] == "succeeded" and not job["result"]["published"] and job["result"]["version"] == published
    assert current_name(root) == published


def test_a_job_interrupted_max_attempts_times_is_failed_with_the_reason(local_cfg, tmp_path):
    cfg = local_cfg.model_copy(update={
        "governor": local_cfg.governor.model_copy(update={"db": tmp_path / "gov.sqlite3"}),
        "documents": local_cfg.documents.model_copy(update={"max_attempts": 1}),
    })
    a = IngestService(cfg, runner="thread")
    a.submit("job_x", "delete", deletes=["anything"])
    a.store.claim("dead")
    a.store.db.close()
    reopened = Database(sqlite_url(cfg.governor.db))  # reopened, as after a crash
    assert SqlJobs(reopened, spool_dir(cfg)).get("job_x")["status"] == "running"
    reopened.close()
    b = IngestService(cfg, runner="thread")
    assert b.recover() == ["job_x"]
    job = b.job("job_x")
    assert job["status"] == "failed" and "interrupted 1 times" in job["error"] and "max_attempts" in job["error"]
    assert b.recover() == [] and not b.run_once()  # nothing left to run, never lost: still listed
    assert [j["id"] for j in b.jobs()] == ["job_x"]


def test_a_crashed_build_is_run_again_then_failed_with_the_reason(local_cfg, tmp_path, monkeypatch):
    import deployments.ingest as ingest

    cfg = local_cfg.model_copy(update={"governor": local_cfg.governor.model_copy(update={"db": tmp_path / "g.sqlite3"})})
    svc = IngestService(cfg, runner="thread")
    svc.submit("job_c", "upsert", [{"id": "kept", "title": "", "text": "Corks are checked by hand.", "metadata": {}}])
    spool = spool_dir(cfg) / "job_c"
    runs = []

    def crash(*a, **kw):
        runs.append(1)
        raise MemoryError("worker ran out of memory")

    monkeypatch.setattr(ingest, "build_job", crash)
    assert svc.run_once()
    job = svc.job("job_c")
    assert job["status"] == "queued" and job["attempts"] == 1 and spool.is_dir(), job  # inputs kept for the next run
    assert "MemoryError: worker ran out of memory" in job["progress"]["message"]
    assert svc.run_once() and len(runs) == cfg.documents.max_attempts == 2
    job = svc.job("job_c")
    assert job["status"] == "failed" and "interrupted 2 times (the build crashed: MemoryError" in job["error"], job
    assert not spool.exists() and not svc.run_once()


def test_a_submit_sent_again_while_the_first_is_written_makes_one_job(tmp_path, monkeypatch):
    """The ingress retries a state call it gave up on; the try still writing must not be undone."""
    import threading

    import state.jobs as ingest

    db = Database(sqlite_url(tmp_path / "jobs.sqlite3"))
    db.upgrade()
    store = SqlJobs(db, tmp_path / "spool")
    real, started, release = ingest._write_synced, threading.Event(), threading.Event()

    def slow(path, data):  # the first try stalls while writing its files
        if not started.is_set():
            started.set()
            release.wait(10)
        real(path, data)

    monkeypatch.setattr(ingest, "_write_synced", slow)
    files = [("a.md", b"# A\n\nAlpha."), ("b.md", b"# B\n\nBeta.")]
    first = threading.Thread(target=store.add, args=("job_r", "upsert"), kwargs={"files": files})
    first.start()
    assert started.wait(10)
    again: list[dict] = []
    second = threading.Thread(target=lambda: again.append(store.add("job_r", "upsert", files=files)))
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits for the first try rather than writing over it
    release.set()
    first.join(10)
    second.join(10)
    assert again[0]["id"] == "job_r" and [j["id"] for j in store.list()] == ["job_r"]
    assert store.inputs("job_r")[1] == files
    db.close()


def test_one_job_runs_at_a_time(local_cfg, tmp_path):
    cfg = local_cfg.model_copy(update={"governor": local_cfg.governor.model_copy(update={"db": tmp_path / "g.sqlite3"})})
    store = IngestService(cfg, runner="thread").store
    store.add("j1", "delete", deletes=["a"])
    store.add("j2", "delete", deletes=["b"])
    assert store.claim("r1")["id"] == "j1"
    assert store.claim("r2") is None  # j1 runs: j2 waits
    assert store.finish("j1", "r1", status="succeeded", result={})
    assert not store.finish("j1", "r1", status="failed")  # a job ends once
    assert store.claim("r2")["id"] == "j2"
    assert store.add("j2", "delete", deletes=["c"])["inputs"]["deletes"] == ["b"]  # same id: the same job


# ---------------------------------------------------------------------------------------------
# formats, unit


def test_html_keeps_the_main_text_and_its_headings():
    title, text = html_text(HTML)
    assert title == "Harvest festival"
    assert text.startswith("# Harvest festival\n\nThe harvest festival") and "## Tickets" in text
    for junk in ("zzscriptzz", "zznavzz", "zzheaderzz", "zzhiddenzz", "zzasidezz", "zzfooterzz", "color: red"):
        assert junk not in text


def test_pdf_pages_become_headings_and_bad_pdfs_fail_with_their_name():
    title, text = pdf_text("a.pdf", make_pdf(["first page words", "second page words"], title="Doc title"), Limits())
    assert title == "Doc title" and text == "## Page 1\n\nfirst page words\n\n## Page 2\n\nsecond page words"
    with pytest.raises(SourceError, match=r"b\.pdf: not a readable PDF"):
        pdf_text("b.pdf", b"%PDF-1.4 garbage", Limits())
    with pytest.raises(SourceError, match=r"c\.pdf: 2 pages; the limit is 1 \(documents.max_pdf_pages\)"):
        pdf_text("c.pdf", make_pdf(["a", "b"]), Limits(max_pdf_pages=1))
    with pytest.raises(SourceError, match="no text in any of its 1 pages"):
        pdf_text("d.pdf", make_pdf([""]), Limits())


def test_docx_headings_tables_and_a_zip_bomb_guard():
    data = make_docx("Handbook", [("Cellar", "Keep it at twelve degrees.")], table=[["a", "b"]])
    title, text = docx_text("h.docx", data, Limits())
    assert title == "Handbook" and text == "# Handbook\n\n## Cellar\n\nKeep it at twelve degrees.\n\na | b"
    with pytest.raises(SourceError, match=r"h\.docx: \d+ bytes uncompressed; the limit is 2048"):
        docx_text("h.docx", data, Limits(max_extracted_bytes=2048))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not a word document")
    with pytest.raises(SourceError, match=r"x\.docx: not a readable DOCX"):
        docx_text("x.docx", buf.getvalue(), Limits())


def test_read_upload_jsonl_parquet_text_and_limits():
    rows = b'{"id": "r1", "text": "one", "domain": "d1"}\n\n{"_id": "r2", "text": "two", "title": "T"}\n'
    docs = list(read_upload("rows.jsonl", rows, domain="up"))
    assert [(d.id, d.domain, d.title, d.source) for d in docs] == [("r1", "d1", "", "rows.jsonl"), ("r2", "up", "T", "rows.jsonl")]
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["p1"], "text": ["parquet text"]}), buf)
    assert [d.id for d in read_upload("t.parquet", buf.getvalue(), domain="up")] == ["p1"]
    (doc,) = read_upload("n.md", "# Title here\n\nbody".encode(), domain="up")
    assert doc.title == "Title here" and doc.markdown and doc.source == "upload:n.md"
    with pytest.raises(SourceError, match=r"rows.jsonl:1: not valid JSON"):
        list(read_upload("rows.jsonl", b"{oops\n", domain="up"))
    with pytest.raises(SourceError, match=r"long.txt: 11 characters of text; the limit is 10"):
        list(read_upload("long.txt", b"01234567890", domain="up", limits=Limits(max_chars=10)))
    with pytest.raises(SourceError, match="unsupported file type"):
        list(read_upload("x.exe", b"MZ", domain="up"))
