"""What any key can read of the server and what a structured-output schema may cost, tried without
Ray: on the in-process app (serve/local.py: the same routes and admission as the Serve ingress; its
engine is never started) or on the pipeline with hand-written stages (as in test_security.py).

* no response names a folder of the server (the index, the indexed source, the models);
* the API documentation pages load only the service's own pinned scripts, under a strict CSP;
* a ``response_format`` schema is bounded in size, nesting and numbers before any compile, and the
  generator's compile of it is time-limited and done once per schema (keyed by its hash).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from serve.api import ChatRequest
from test_security import Echo, chat_body, make_cfg, pipeline_with


@pytest.fixture()
def app(local_cfg, built_index, tmp_path):
    def start(*, auth=False, http=None):
        from serve.local import create_app

        cfg = make_cfg(local_cfg, built_index, tmp_path, auth=auth, http=http)
        return TestClient(create_app(cfg), client=("127.0.0.1", 50000), base_url="http://localhost"), cfg

    return start


def server_folders(cfg, built_index) -> list[str]:
    source, index = built_index
    return [str(source), str(source.resolve()), str(index), str(index.resolve()), str(cfg.models.dir),
            str(cfg.models.dir.resolve())]


# ---------------------------------------------------------------------------------------------
# no response carries a path on the server


def test_models_and_sources_carry_no_server_path(app, built_index, local_cfg, tmp_path):
    client, cfg = app()
    models = client.get("/v1/models")
    search = client.post("/v1/search", json={"query": "When does the tasting room open?", "top_k": 3})
    assert models.status_code == 200 and search.status_code == 200, (models.text, search.text)
    assert models.json()["data"][0]["root"] == cfg.models.generator.name
    results = search.json()["results"]
    assert results and all(not r["source"].startswith("/") for r in results)
    # the source is the file relative to the indexed folder: for a text file, its document id
    assert all(r["source"] == r["document_id"] for r in results), [(r["source"], r["document_id"]) for r in results]

    p, _ = pipeline_with(local_cfg, built_index, tmp_path, Echo())

    async def ask():
        req = ChatRequest(**chat_body(temperature=0))
        return await p.chat_completion(req, await p.prepare(req, "rid-paths", bypass_cache=True))

    chat = asyncio.run(ask())
    sources = chat["rag"]["sources"]
    assert sources and all(s["source"] == s["document_id"] for s in sources), sources
    for text in (models.text, search.text, json.dumps(chat)):
        for folder in server_folders(cfg, built_index):
            assert folder not in text


def test_an_index_built_with_absolute_sources_shows_only_the_file_name():
    from serve.pipeline import public_source

    assert public_source("/srv/rag/corpus/guide/tasting.md") == "tasting.md"
    assert public_source("C:\\corpus\\guide\\tasting.md") == "tasting.md"
    assert public_source("guide/tasting.md") == "guide/tasting.md"
    assert public_source("upload:notes.md") == "upload:notes.md"


def test_rows_of_a_jsonl_source_name_their_file_relative_to_the_folder(tmp_path):
    from indexing.documents import read_source

    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "rows.jsonl").write_text(json.dumps({"id": "r1", "text": "Opens at ten."}) + "\n")
    (tmp_path / "a.md").write_text("# A\n\ntext\n")
    docs = {d.id: d.source for d in read_source(tmp_path)}
    assert docs == {"r1": "shop/rows.jsonl", "a.md": "a.md"}
