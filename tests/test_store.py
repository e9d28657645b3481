"""Index versions: incremental re-index, atomic publish, interrupted builds, refusing bad indexes, private
file modes."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CORPUS, SHARED_DATA, write_corpus
from indexing.jobs import index_source
from indexing.store import (
    IndexBuildError,
    IndexLoadError,
    _build_lock,
    current_name,
    current_path,
    load_current,
    load_version,
)

quiet = {"log": lambda _: None}


@pytest.fixture
def fresh(tmp_path, local_cfg):
    """A corpus in tmp_path/src indexed into tmp_path/index."""
    src = write_corpus(tmp_path / "src")
    root = tmp_path / "index"
    first = index_source(local_cfg, src, root, **quiet)
    return src, root, first


def test_first_build_publishes_everything(fresh):
    _, root, r = fresh
    assert r.published and r.embedded == r.chunks == len(CORPUS) and r.reused == 0
    assert sorted(r.added) == sorted(CORPUS)
    m = json.loads((current_path(root) / "manifest.json").read_text())
    assert m["dim"] == 384 and m["documents"] == len(CORPUS) and m["chunks"] == len(CORPUS)
    assert m["chunking"] == {"size": 200, "overlap": 40} and m["dense_index"] == "flat"
    assert set(m["files"]) >= {"chunks.parquet", "vectors.npy", "dense.faiss"}
    assert m["model"]["checksum"]  # the embedder's provisioning checksum


def test_unchanged_reindex_embeds_nothing(fresh, local_cfg):
    src, root, first = fresh
    t = time.perf_counter()
    again = index_source(local_cfg, src, root, **quiet)
    assert not again.published and again.embedded == 0 and again.skipped == len(CORPUS)
    assert current_name(root) == first.version
    assert time.perf_counter() - t < 30  # "seconds", generous for a noisy machine


def test_one_changed_document_reembeds_only_its_chunks(fresh, local_cfg):
    src, root, first = fresh
    (src / "visiting" / "hours.md").write_text("# Opening hours\n\nThe tasting room now opens at 9 am daily.")
    (src / "merchandise" / "returns.md").unlink()
    r = index_source(local_cfg, src, root, **quiet)
    assert r.published and r.changed == ["visiting/hours.md"] and r.removed == ["merchandise/returns.md"]
    assert r.embedded == 1 and r.reused == len(CORPUS) - 2
    idx = load_current(root)
    assert "merchandise/returns.md" not in idx.chunks["document_id"]
    row = idx.chunks["document_id"].index("visiting/hours.md")
    assert "9 am" in idx.chunks["text"][row]
    # the reused vectors are the old ones, bit for bit
    old = load_version(root / "versions" / first.version)
    r_old = old.chunks["document_id"].index("wine/reds.md")
    r_new = idx.chunks["document_id"].index("wine/reds.md")
    assert np.array_equal(old.vectors[r_old], idx.vectors[r_new])


def test_full_rebuild_reuses_nothing(fresh, local_cfg):
    src, root, _ = fresh
    r = index_source(local_cfg, src, root, full=True, **quiet)
    assert r.published and r.embedded == len(CORPUS) and r.reused == 0


def test_leftover_temp_folder_is_ignored_then_cleaned(fresh, local_cfg):
    src, root, first = fresh
    junk = root / "versions" / ".tmp-v-crashed"
    junk.mkdir()
    (junk / "vectors.npy").write_bytes(b"half")
    assert load_current(root).name == first.version
    (src / "wine" / "new.md").write_text("# Rosé\n\nA dry rosé from grenache.")
    index_source(local_cfg, src, root, **quiet)
    assert not junk.exists()


def test_concurrent_build_is_refused(fresh, local_cfg):
    src, root, _ = fresh
    with _build_lock(root):
        with pytest.raises(IndexBuildError, match=r"another index build holds .*\.build\.lock"):
            index_source(local_cfg, src, root, **quiet)


@pytest.mark.skipif(not (SHARED_DATA / "msmarco-5k").is_dir(), reason="needs ../shared/data")
def test_killed_build_leaves_previous_version_live(fresh, tmp_path):
    _, root, first = fresh
    big = tmp_path / "big.jsonl"
    with (SHARED_DATA / "msmarco-5k" / "corpus.jsonl").open() as f:
        big.write_text("".join(next(f) for _ in range(1500)))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "cli.main", "index", str(big), "--index-dir", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**__import__("os").environ, "RAGRAPH__INDEXING__ENGINE": "local"},
    )
    for line in proc.stdout:  # kill mid-embedding, once the first progress line is out
        if "embedded" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert current_name(root) == first.version
    idx = load_current(root)  # intact: every checksum verified
    assert sorted(set(idx.chunks["document_id"])) == sorted(CORPUS)


# -- refusing corrupt or mismatched indexes ----------------------------------------------------


@pytest.fixture
def version_copy(fresh, tmp_path):
    _, root, first = fresh
    dst = tmp_path / "copy"
    shutil.copytree(root / "versions" / first.version, dst)
    return dst


def test_intact_copy_loads(version_copy):
    assert len(load_version(version_copy, expected_dim=384)) == len(CORPUS)


def test_missing_file_is_named(version_copy):
    (version_copy / "dense.faiss").unlink()
    with pytest.raises(IndexLoadError, match=r"dense.faiss: file listed in the manifest is missing"):
        load_version(version_copy)


def test_corrupt_file_is_named(version_copy):
    p = version_copy / "vectors.npy"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match=r"vectors.npy: checksum differs from .*manifest.json; the file is corrupt"):
        load_version(version_copy)


def test_bad_manifest_is_named(version_copy):
    (version_copy / "manifest.json").write_text("{oops")
    with pytest.raises(IndexLoadError, match=r"manifest.json: manifest is not valid JSON"):
        load_version(version_copy)


def test_manifest_missing_keys_is_named(version_copy):
    m = json.loads((version_copy / "manifest.json").read_text())
    del m["dim"]
    (version_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexLoadError, match=r"manifest lacks \['dim'\]"):
        load_version(version_copy)


def test_wrong_dimension_for_the_embedder_is_refused(version_copy):
    with pytest.raises(IndexLoadError, match=r"index has dim 384 but the embedder gives 768; re-index with --full"):
        load_version(version_copy, expected_dim=768)


def test_vectors_that_disagree_with_the_manifest_are_refused(version_copy):
    np.save(version_copy / "vectors.npy", np.zeros((len(CORPUS), 128), dtype=np.float32))
    with pytest.raises(IndexLoadError, match=r"vectors.npy: shape \(6, 128\), manifest says \(6, 384\)"):
        load_version(version_copy, verify=False)


def test_no_published_index_says_how_to_make_one(tmp_path):
    with pytest.raises(IndexLoadError, match=r"no index has been published .*run `ragraph index`"):
        load_current(tmp_path)


def test_above_the_ann_threshold_faiss_uses_hnsw(tmp_path, local_cfg):
    from deployments.retriever import HybridRetriever

    cfg = local_cfg.model_copy(update={"indexing": local_cfg.indexing.model_copy(update={"ann_threshold": 3})})
    src, root = write_corpus(tmp_path / "src"), tmp_path / "index"
    index_source(cfg, src, root, **quiet)
    assert json.loads((current_path(root) / "manifest.json").read_text())["dense_index"] == "hnsw"
    r = HybridRetriever.from_config(cfg, index_dir=root)
    assert r.run(query="When is the tasting room open?", strategy="semantic")[0].document_id == "visiting/hours.md"
    assert r.index.dense.hnsw.efSearch == cfg.indexing.hnsw_ef_search


def test_a_link_leaving_the_source_is_not_indexed_and_is_reported(tmp_path, local_cfg):
    """Issue 16 row 14: a link in the source folder to a file outside it is neither indexed nor served."""
    src = write_corpus(tmp_path / "src")
    secret = tmp_path / "secret.md"
    secret.write_text("# Secret\nthe root password is hunter2")
    (src / "leak.md").symlink_to(secret)
    lines: list[str] = []
    report = index_source(local_cfg, src, tmp_path / "index", log=lines.append)
    assert report.published and "leak.md" not in report.added
    assert report.outside_links == [f"leak.md -> {secret}"]
    assert "links leading outside the source skipped" in report.summary()
    assert any("skipped 1 links leading outside" in line for line in lines)
    index = load_current(tmp_path / "index")
    assert not any("hunter2" in t for t in index.chunks["text"]) and len(index.chunks["text"]) == len(CORPUS)


def test_index_files_are_0600_and_folders_0700_whatever_the_umask(tmp_path, local_cfg):
    import os

    src = write_corpus(tmp_path / "src")
    root = tmp_path / "index"
    before = os.umask(0)  # the most permissive: a plain open() would make 0666 files
    try:
        index_source(local_cfg, src, root, **quiet)
        first = current_path(root)
        os.chmod(first, 0o755)  # as a version written before builds were private
        os.chmod(first / "chunks.parquet", 0o644)
        (src / "visiting" / "hours.md").write_text("# Opening hours\n\nThe tasting room now opens at 9 am daily.")
        index_source(local_cfg, src, root, **quiet)
    finally:
        os.umask(before)
    assert current_path(root) != first
    made = [root, root / "current", root / "versions", *(root / "versions").rglob("*")]
    assert len(made) > 10 and first in made
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in made
             if p.stat().st_mode & 0o777 != (0o700 if p.is_dir() else 0o600)}
    assert wrong == {}
