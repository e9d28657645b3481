"""The retriever follows the published index version: switches to a new one, refuses a corrupt
one (the old keeps serving) and refuses an index built with another embedder."""

import json
import shutil

import pytest

from conftest import write_corpus
from deployments.retriever import HybridRetriever
from indexing.jobs import index_source
from indexing.store import IndexLoadError, current_name

quiet = {"log": lambda _: None}


@pytest.fixture
def live(tmp_path, local_cfg):
    src = write_corpus(tmp_path / "src")
    root = tmp_path / "index"
    index_source(local_cfg, src, root, **quiet)
    r = HybridRetriever.from_config(local_cfg, index_dir=root)
    r.warm_up()
    return src, root, r


def test_refresh_switches_to_a_new_version(live, local_cfg):
    src, root, r = live
    old = r.version
    assert r.refresh() is None  # nothing new
    write_corpus(src, {"team/cellar.md": "# Cellar\n\nThe cellar master is Ilse Vandenberghe."})
    index_source(local_cfg, src, root, **quiet)
    in_flight = r._state  # what a request that started before the swap holds
    assert r.refresh() == current_name(root) != old
    assert r.version != old and in_flight.index.name == old
    res = r.search(query="who is the cellar master?", top_k=3)
    assert res.version == r.version and res.passages[0].document_id == "team/cellar.md"


def test_corrupt_new_version_is_refused_and_the_old_keeps_serving(live, local_cfg):
    src, root, r = live
    old = r.version
    write_corpus(src, {"team/cellar.md": "# Cellar\n\nThe cellar master is Ilse Vandenberghe."})
    index_source(local_cfg, src, root, **quiet)
    new = current_name(root)
    (root / "versions" / new / "vectors.npy").write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="vectors.npy"):
        r.refresh()
    assert r.version == old and r.search(query="parking", top_k=1).version == old
    assert r.refresh() is None  # refused once, not retried until `current` moves


def test_index_from_another_embedder_is_refused(live):
    src, root, r = live
    manifest = root / "versions" / r.version / "manifest.json"
    m = json.loads(manifest.read_text())
    m["model"]["checksum"] = "0" * 64
    copy = root / "versions" / "v-other"
    shutil.copytree(root / "versions" / r.version, copy)
    (copy / "manifest.json").write_text(json.dumps({**m, "name": "v-other"}))
    (root / "current").write_text("v-other")
    with pytest.raises(IndexLoadError, match="built with embedder checksum 000000000000"):
        r.refresh()
