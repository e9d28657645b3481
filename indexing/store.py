"""Versioned indexes: build, publish atomically, load with checks.

Layout of an index root::

    <root>/current                 the live version's name (replaced atomically)
    <root>/versions/<name>/        one complete version:
        manifest.json              model, dimensions, chunking, counts, checksums, created_at
        chunks.parquet             one row per chunk: text and metadata
        vectors.npy                float32 (chunks, dim), row-aligned with chunks.parquet
        dense.faiss                FAISS index over the vectors
        bm25/                      bm25s index + document frequencies

A build writes ``versions/.tmp-<name>/`` and renames it into place, then swaps ``current``: an
interrupted build leaves the previous version live and intact. Builds of one root are serialised
with a lock file. Re-indexing reuses the vector of every chunk whose checksum is unchanged (same
embedding model), so only new or changed text is embedded.

The versions hold the indexed (and uploaded) text: whatever the umask, every file a build writes
is 0600 and every folder 0700 (``versions/`` and what is in it tightened at each build, a missing
root made 0700); a root that exists keeps its mode.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from indexing.calibrate import VERSION as CALIBRATION_VERSION
from indexing.chunking import Chunk, chunk_document
from indexing.documents import Document, read_source
from common.files import private_dir
from common.manifest import first_bad_file, tree_checksums

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHUNK_COLUMNS = [f for f in Chunk.__dataclass_fields__]
REQUIRED_KEYS = ("format_version", "name", "model", "dim", "chunking", "documents", "chunks", "files", "created_at")
Log = Callable[[str], None]


class IndexLoadError(ValueError):
    """An index version is corrupt or does not match what loads it. Names the file and the problem."""


class IndexBuildError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class BuildSettings:
    model: str  # model folder or hub id
    model_checksum: str  # from the model's manifest; "" for hub models
    embedder_dtype: str
    chunk_size: int
    chunk_overlap: int
    bm25_k1: float
    bm25_b: float
    stemmer: str
    ann_threshold: int
    hnsw_m: int


@dataclass(slots=True)
class BuildReport:
    version: str | None = None
    previous: str | None = None
    published: bool = False
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: int = 0
    outside_links: list[str] = field(default_factory=list)  # "path -> target": links leaving the source, not read
    chunks: int = 0
    embedded: int = 0
    reused: int = 0
    engine: str = "none"
    embed_nodes: dict[str, int] = field(default_factory=dict)  # Ray node id -> chunks embedded there
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        s = (
            f"documents: {len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
            f"{self.skipped} skipped (unchanged); chunks: {self.chunks} total, {self.embedded} embedded, "
            f"{self.reused} reused"
        )
        if self.outside_links:
            shown = ", ".join(self.outside_links[:5]) + (", ..." if len(self.outside_links) > 5 else "")
            s += f"; {len(self.outside_links)} links leading outside the source skipped (not indexed): {shown}"
        if self.published:
            return f"published {self.version} (previous: {self.previous or 'none'}); {s}"
        return f"nothing changed; {self.previous} stays live; {s}"


# ---------------------------------------------------------------------------------------------
# files and pointers


def current_name(root: Path) -> str | None:
    try:
        name = (root / "current").read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def current_path(root: Path) -> Path:
    name = current_name(root)
    if name is None:
        raise IndexLoadError(f"{root / 'current'}: no index has been published in {root}; run `ragraph index`")
    return root / "versions" / name


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)  # the umask may have taken bits away
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (fsync the folder itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _private_tree(path: Path) -> None:
    """``path`` and everything under it: folders 0700, files 0600 (links are not followed; what
    another user owns is left as it is)."""

    def private(p: str, mode: int) -> None:
        try:
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o777 != mode and st.st_uid == os.getuid():
                os.chmod(p, mode)
        except (FileNotFoundError, PermissionError):  # pruned meanwhile, or not ours
            pass

    private(str(path), 0o700)
    for top, dirs, files in os.walk(path):
        for d in dirs:
            private(os.path.join(top, d), 0o700)
        for f in files:
            private(os.path.join(top, f), 0o600)


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    private_dir(root)
    fd = os.open(root / ".build.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IndexBuildError(f"another index build holds {root / '.build.lock'}; wait for it to finish") from None
        yield


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class IndexVersion:
    name: str
    path: Path
    manifest: dict[str, Any]
    chunks: dict[str, list]  # column -> values, row-aligned with vectors
    vectors: np.ndarray
    dense: Any  # faiss.Index
    bm25: Any  # indexing.lexical.BM25Index

    def __len__(self) -> int:
        return len(self.chunks["id"])

    def chunk(self, row: int) -> Chunk:
        return Chunk(**{c: self.chunks[c][row] for c in CHUNK_COLUMNS})


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{path}: manifest is missing; {folder} is not a complete index version")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexLoadError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise IndexLoadError(f"{path}: manifest must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise IndexLoadError(f"{path}: manifest lacks {missing}")
    if m["format_version"] != FORMAT_VERSION:
        raise IndexLoadError(
            f"{path}: format_version {m['format_version']!r}, this ragraph reads {FORMAT_VERSION}; re-index with --full"
        )
    return m


def verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    bad = first_bad_file(folder, manifest["files"])
    if bad is None:
        return
    p, problem = bad
    if problem == "missing":
        raise IndexLoadError(f"{p}: file listed in the manifest is missing")
    raise IndexLoadError(f"{p}: checksum differs from {folder / MANIFEST}; the file is corrupt")


def load_version(
    folder: Path,
    *,
    expected_dim: int | None = None,
    ef_search: int = 128,
    faiss_device: str = "cpu",
    verify: bool = True,
) -> IndexVersion:
    """Load one version, refusing anything corrupt or mismatched with an error naming the file."""
    import pyarrow.parquet as pq

    from indexing.dense import load_faiss
    from indexing.lexical import BM25Index

    folder = Path(folder)
    if not folder.is_dir():
        raise IndexLoadError(f"{folder}: index version folder does not exist")
    m = read_manifest(folder)
    if verify:
        verify_files(folder, m)
    dim, n = int(m["dim"]), int(m["chunks"])
    if expected_dim is not None and dim != expected_dim:
        raise IndexLoadError(
            f"{folder / MANIFEST}: index has dim {dim} but the embedder gives {expected_dim}; re-index with --full"
        )
    try:
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    except (ValueError, OSError) as e:
        raise IndexLoadError(f"{folder / 'vectors.npy'}: not a readable numpy array ({e})") from None
    if vectors.shape != (n, dim):
        raise IndexLoadError(f"{folder / 'vectors.npy'}: shape {vectors.shape}, manifest says ({n}, {dim})")
    try:
        table = pq.read_table(folder / "chunks.parquet")
    except Exception as e:
        raise IndexLoadError(f"{folder / 'chunks.parquet'}: not readable ({e})") from None
    if table.num_rows != n or set(table.column_names) != set(CHUNK_COLUMNS):
        raise IndexLoadError(
            f"{folder / 'chunks.parquet'}: {table.num_rows} rows with columns {table.column_names}; "
            f"manifest says {n} rows of {CHUNK_COLUMNS}"
        )
    try:
        dense = load_faiss(folder / "dense.faiss", ef_search=ef_search, device=faiss_device)
    except RuntimeError as e:
        raise IndexLoadError(f"{folder / 'dense.faiss'}: not a readable FAISS index ({e})") from None
    if dense.d != dim or dense.ntotal != n:
        raise IndexLoadError(
            f"{folder / 'dense.faiss'}: {dense.ntotal} vectors of dim {dense.d}, manifest says {n} of dim {dim}"
        )
    try:
        bm25 = BM25Index.load(folder / "bm25")
    except (OSError, ValueError, KeyError) as e:
        raise IndexLoadError(f"{folder / 'bm25'}: not a readable BM25 index ({e})") from None
    if bm25.size != n:
        raise IndexLoadError(f"{folder / 'bm25'}: {bm25.size} documents, manifest says {n}")
    return IndexVersion(m["name"], folder, m, table.to_pydict(), vectors, dense, bm25)


def load_current(root: Path, **kw: Any) -> IndexVersion:
    return load_version(current_path(Path(root)), **kw)


# ---------------------------------------------------------------------------------------------
# building


def _previous_vectors(
    root: Path, settings: BuildSettings
) -> tuple[str | None, dict[str, Any], dict[str, np.ndarray], dict]:
    """The live version's name, manifest, checksum -> vector (when embedded by the same model and
    precision) and chunk columns."""
    name = current_name(root)
    if name is None:
        return None, {}, {}, {}
    folder = root / "versions" / name
    try:
        m = read_manifest(folder)
        import pyarrow.parquet as pq

        chunks = pq.read_table(folder / "chunks.parquet").to_pydict()
        vectors = np.load(folder / "vectors.npy", mmap_mode="r")
    except (IndexLoadError, OSError, ValueError) as e:
        raise IndexBuildError(f"the live version {folder} cannot be read ({e}); rebuild with --full") from None
    same_model = (m["model"].get("name"), m["model"].get("checksum"), m["model"].get("dtype")) == (
        settings.model, settings.model_checksum, settings.embedder_dtype
    )
    if not same_model:  # vectors from another model or precision are never mixed in
        return name, m, {}, chunks
    return name, m, {c: vectors[i] for i, c in enumerate(chunks["checksum"])}, chunks


def build_index(
    source: Path,
    root: Path,
    settings: BuildSettings,
    *,
    embed: Callable[[list[str]], tuple[np.ndarray, str]],
    calibration_embed: Callable[[list[str]], tuple[np.ndarray, str]] | None = None,
    full: bool = False,
    keep_versions: int = 3,
    log: Log = print,
) -> BuildReport:
    """Read ``source``, chunk, embed what is new, build BM25 + FAISS, publish a new version.

    ``embed(texts) -> (vectors, engine_name)`` does the embedding (in-process or Ray Data);
    ``calibration_embed`` (default: ``embed``) embeds the fusion calibration's pseudo-queries and
    passages, so a caller that counts what ``embed`` did counts the corpus's chunks only.
    Documents uploaded over the API (the live manifest's ``uploaded`` list) that ``source`` does not
    hold are kept, with their chunks as they are; a source document with the same id replaces one.
    """
    root = Path(root)
    report = BuildReport()
    t0 = time.perf_counter()
    with _build_lock(root):
        _clear_tmp(root)
        docs = list(read_source(source, skipped=report.outside_links))
        if report.outside_links:
            log(f"  skipped {len(report.outside_links)} links leading outside {source} (not indexed): "
                f"{', '.join(report.outside_links[:5])}")
        if not docs:
            raise IndexBuildError(f"source {source} holds no documents")
        seen: set[str] = set()
        dup = {d.id for d in docs if d.id in seen or seen.add(d.id)}
        if dup:
            raise IndexBuildError(f"source {source}: duplicate document ids {sorted(dup)[:5]}")
        chunks = [c for d in docs for c in chunk_document(d, size=settings.chunk_size, overlap=settings.chunk_overlap)]
        try:
            live_manifest, live_chunks = _live(root)
        except IndexBuildError:
            if not full:
                raise
            log("  the live version cannot be read: a full rebuild keeps no uploaded document")
            live_manifest, live_chunks = {}, {}
        uploaded = set(live_manifest.get("uploaded", [])) - seen
        kept = [c for c in _rows(live_chunks) if c.document_id in uploaded]
        if kept:
            log(f"  keeping {len(uploaded)} documents uploaded over the API ({len(kept)} chunks)")
        report.seconds["read_and_chunk"] = time.perf_counter() - t0
        log(f"  read {len(docs)} documents into {len(chunks)} chunks ({report.seconds['read_and_chunk']:.1f} s)")
        return _build_version(root, settings, chunks + kept, uploaded=uploaded, source=str(source), embed=embed,
                              calibration_embed=calibration_embed, full=full, keep_versions=keep_versions, log=log, report=report, t0=t0)


def apply_changes(
    root: Path,
    settings: BuildSettings,
    *,
    upserts: list[Document],
    deletes: list[str],
    embed: Callable[[list[str]], tuple[np.ndarray, str]],
    keep_versions: int = 3,
    log: Log = print,
) -> BuildReport:
    """The live version with ``upserts`` added or replaced and ``deletes`` removed, published as a
    new version (what the documents API runs). Every other document keeps its chunks as they are;
    only new or changed chunks are embedded. Idempotent: applying the same changes again publishes
    nothing. Raises :class:`IndexBuildError` when the result would hold no document."""
    root = Path(root)
    report = BuildReport()
    t0 = time.perf_counter()
    ids = [d.id for d in upserts]
    if len(set(ids)) != len(ids):
        raise IndexBuildError(f"duplicate document ids {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
    with _build_lock(root):
        _clear_tmp(root)
        live_manifest, live_chunks = _live(root)
        replaced = set(ids) | set(deletes)
        rows = _rows(live_chunks)
        kept = [c for c in rows if c.document_id not in replaced]
        before: dict[str, list[Chunk]] = {}
        for c in rows:
            before.setdefault(c.document_id, []).append(c)
        new = []
        for d in upserts:
            chunks = chunk_document(d, size=settings.chunk_size, overlap=settings.chunk_overlap)
            old = before.get(d.id, [])
            # the same document sent again keeps its rows (and its updated_at): nothing to publish
            new += old if [replace(c, updated_at="") for c in old] == [replace(c, updated_at="") for c in chunks] \
                else chunks
        if not kept and not new:
            raise IndexBuildError("these changes would leave the index without any document; nothing was published "
                                  "(upload documents first, or index a source with `ragraph index`)")
        uploaded = (set(live_manifest.get("uploaded", [])) | set(ids)) - set(deletes)
        report.seconds["read_and_chunk"] = time.perf_counter() - t0
        log(f"  {len(upserts)} documents in {len(new)} chunks, {len(set(deletes))} to delete, "
            f"{len(kept)} chunks kept from {live_manifest.get('name') or 'no live version'}")
        return _build_version(root, settings, kept + new, uploaded=uploaded,
                              source=str(live_manifest.get("source") or "api"), embed=embed, full=False,
                              keep_versions=keep_versions, log=log, report=report, t0=t0)


def _clear_tmp(root: Path) -> None:
    versions = root / "versions"
    private_dir(versions)
    _private_tree(versions)  # versions written before they were private are tightened too
    for stale in versions.glob(".tmp-*"):  # left by an interrupted build; the lock says none runs now
        shutil.rmtree(stale, ignore_errors=True)


def _live(root: Path) -> tuple[dict[str, Any], dict[str, list]]:
    """The live version's manifest and chunk columns ({}, {} when none is published)."""
    name = current_name(root)
    if name is None:
        return {}, {}
    folder = root / "versions" / name
    try:
        import pyarrow.parquet as pq

        return read_manifest(folder), pq.read_table(folder / "chunks.parquet").to_pydict()
    except (IndexLoadError, OSError, ValueError) as e:
        raise IndexBuildError(f"the live version {folder} cannot be read ({e}); rebuild with --full") from None


def _rows(columns: dict[str, list]) -> list[Chunk]:
    if not columns:
        return []
    return [Chunk(**dict(zip(CHUNK_COLUMNS, row, strict=True)))
            for row in zip(*(columns[k] for k in CHUNK_COLUMNS), strict=True)]


def _build_version(
    root: Path,
    settings: BuildSettings,
    chunks: list[Chunk],
    *,
    uploaded: set[str],
    source: str,
    embed: Callable[[list[str]], tuple[np.ndarray, str]],
    calibration_embed: Callable[[list[str]], tuple[np.ndarray, str]] | None = None,
    full: bool,
    keep_versions: int,
    log: Log,
    report: BuildReport,
    t0: float,
) -> BuildReport:
    """Embed what is new in ``chunks``, build the indexes and publish them (the build lock is held)."""
    from indexing.dense import build_faiss, index_kind, save_faiss
    from indexing.lexical import BM25Index

    versions = root / "versions"
    n_docs = len({c.document_id for c in chunks})
    prev_name, prev_manifest, prev_vecs, prev_chunks = (
        _previous_vectors(root, settings) if not full else (current_name(root), {}, {}, {})
    )
    report.previous = prev_name
    _diff_documents(report, chunks, prev_chunks)
    if prev_name and not full and not report.added and not report.changed and not report.removed and prev_vecs:
        if (prev_manifest.get("settings") == asdict(settings) and _same_rows(chunks, prev_chunks)
                and prev_manifest.get("calibration", {}).get("version") == CALIBRATION_VERSION
                and sorted(prev_manifest.get("uploaded", [])) == sorted(uploaded)):
            report.chunks, report.reused = len(chunks), len(chunks)
            report.seconds["total"] = time.perf_counter() - t0
            return report

    t1 = time.perf_counter()
    texts = [c.embed_text for c in chunks]
    todo = [i for i, c in enumerate(chunks) if c.checksum not in prev_vecs]
    report.embedded, report.reused, report.chunks = len(todo), len(chunks) - len(todo), len(chunks)
    log(f"  embedding {len(todo)} chunks, reusing {report.reused}")
    new_vecs, report.engine = embed([texts[i] for i in todo]) if todo else (None, "none")
    dim = new_vecs.shape[1] if new_vecs is not None else len(next(iter(prev_vecs.values())))
    vectors = np.zeros((len(chunks), dim), dtype=np.float32)
    if todo:
        vectors[todo] = new_vecs
    for i, c in enumerate(chunks):
        if c.checksum in prev_vecs:
            vectors[i] = prev_vecs[c.checksum]
    report.seconds["embed"] = time.perf_counter() - t1

    name = datetime.now(UTC).strftime("v%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    tmp = versions / f".tmp-{name}"
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    t2 = time.perf_counter()
    _write_chunks(tmp / "chunks.parquet", chunks)
    np.save(tmp / "vectors.npy", vectors)
    dense = build_faiss(vectors, ann_threshold=settings.ann_threshold, hnsw_m=settings.hnsw_m)
    save_faiss(dense, tmp / "dense.faiss")
    (tmp / "bm25").mkdir()
    BM25Index.build(texts, k1=settings.bm25_k1, b=settings.bm25_b, stemmer=settings.stemmer).save(tmp / "bm25")
    report.seconds["build_indexes"] = time.perf_counter() - t2
    log(f"  built FAISS ({index_kind(dense)}) and BM25 over {len(chunks)} chunks ({report.seconds['build_indexes']:.1f} s)")
    t3 = time.perf_counter()
    calibration = calibrate_chunks(chunks, vectors, lambda t: (calibration_embed or embed)(t)[0], settings)
    report.seconds["calibrate"] = time.perf_counter() - t3
    log(f"  calibrated fusion on {calibration['queries']} pseudo-queries ({report.seconds['calibrate']:.1f} s)")

    files = tree_checksums(tmp)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "model": {"name": settings.model, "checksum": settings.model_checksum, "dtype": settings.embedder_dtype},
        "dim": dim,
        "chunking": {"size": settings.chunk_size, "overlap": settings.chunk_overlap},
        "settings": asdict(settings),
        "dense_index": index_kind(dense),
        "source": source,
        "documents": n_docs,
        "chunks": len(chunks),
        "files": files,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "calibration": calibration,
        "uploaded": sorted(uploaded),
    }
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))
    _private_tree(tmp)  # what numpy, FAISS, bm25s and pyarrow wrote with the umask's modes
    fsync_dir(tmp)
    tmp.rename(versions / name)
    fsync_dir(versions)
    _write_atomic(root / "current", name + "\n")
    report.version, report.published = name, True
    _prune(versions, keep=keep_versions, live=name)
    report.seconds["total"] = time.perf_counter() - t0
    return report


# ---------------------------------------------------------------------------------------------
# operations: versions, rollback, what the live version holds


class RollbackError(ValueError):
    """A rollback was refused; ``code`` says why (``version_not_found``, ``embedder_mismatch``,
    ``version_corrupt``) and the message names the version and what exists."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def list_versions(root: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """(the live version's name, every complete version kept, newest first: name, created_at,
    documents, chunks, model, dim, source, live). A folder without a readable manifest is listed
    with ``error``."""
    root = Path(root)
    live = current_name(root)
    out = []
    folder = root / "versions"
    names = sorted((p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True) \
        if folder.is_dir() else []
    for name in names:
        try:
            m = read_manifest(folder / name)
        except IndexLoadError as e:
            out.append({"name": name, "live": name == live, "error": str(e).replace(str(root), "<index>")})
            continue
        out.append({"name": name, "live": name == live, "created_at": m["created_at"], "documents": m["documents"],
                    "chunks": m["chunks"], "model": m["model"], "dim": m["dim"], "source": m.get("source", ""),
                    "uploaded": len(m.get("uploaded", []))})
    return live, out


def same_embedder(manifest: dict[str, Any], settings: BuildSettings) -> bool:
    m = manifest.get("model") or {}
    return (m.get("name"), m.get("checksum"), m.get("dtype")) == (
        settings.model, settings.model_checksum, settings.embedder_dtype)


def rollback(root: Path, name: str, settings: BuildSettings) -> tuple[str | None, str]:
    """Make the kept version ``name`` live, as atomically as a publish (one rename of ``current``),
    after checking its files against its manifest. Refuses a version embedded by another model or
    precision than ``settings`` (its vectors would not match the queries'). Returns (previous, name).
    Raises :class:`RollbackError`, or :class:`IndexBuildError` while a build holds the index."""
    root = Path(root)
    with _build_lock(root):
        folder = root / "versions" / name
        if "/" in name or name.startswith(".") or not folder.is_dir():
            _, kept = list_versions(root)
            raise RollbackError(f"no index version {name!r} is kept; kept: {[v['name'] for v in kept]}",
                                "version_not_found")
        try:
            m = read_manifest(folder)
            verify_files(folder, m)
        except IndexLoadError as e:
            raise RollbackError(f"version {name} cannot be loaded: {str(e).replace(str(root), '<index>')}",
                                "version_corrupt") from None
        if not same_embedder(m, settings):
            raise RollbackError(
                f"version {name} was embedded by {m['model'].get('name')!r} ({m['model'].get('dtype')}, checksum "
                f"{str(m['model'].get('checksum'))[:12]}), the service embeds queries with {settings.model!r} "
                f"({settings.embedder_dtype}, checksum {settings.model_checksum[:12]}); its vectors would not match",
                "embedder_mismatch")
        previous = current_name(root)
        if previous != name:
            _write_atomic(root / "current", name + "\n")
            fsync_dir(root)
        return previous, name


def live_documents(root: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """(the live version's name, its documents in id order: id, title, chunks, source, domain, updated_at,
    uploaded)."""
    manifest, cols = _live(Path(root))
    uploaded = set(manifest.get("uploaded", []))
    docs: dict[str, dict[str, Any]] = {}
    for i, d in enumerate(cols.get("document_id", [])):
        row = docs.get(d)
        if row is None:
            docs[d] = {"id": d, "title": cols["title"][i], "chunks": 1, "source": cols["source"][i],
                       "domain": cols["domain"][i], "updated_at": cols["updated_at"][i], "uploaded": d in uploaded}
        else:
            row["chunks"] += 1
    return manifest.get("name"), [docs[k] for k in sorted(docs)]


def settings_of(manifest: dict[str, Any]) -> BuildSettings:
    """The build settings a version's manifest recorded."""
    return BuildSettings(**manifest["settings"])


def calibrate_chunks(
    chunks: list[Chunk], vectors: np.ndarray, embed: Callable[[list[str]], np.ndarray], settings: BuildSettings
) -> dict[str, Any]:
    """The fusion calibration of :mod:`indexing.calibrate` for these chunks (stored in the manifest)."""
    from indexing.calibrate import calibrate
    from indexing.lexical import BM25Index

    return calibrate(
        texts=[c.text for c in chunks],
        heads=["\n".join(p for p in (c.title, c.heading_path) if p) for c in chunks],
        embed_texts=[c.embed_text for c in chunks],
        vectors=vectors,
        embed=embed,
        build_bm25=lambda t: BM25Index.build(t, k1=settings.bm25_k1, b=settings.bm25_b, stemmer=settings.stemmer),
    )


def _diff_documents(report: BuildReport, chunks: list[Chunk], prev: dict[str, list]) -> None:
    def by_doc(ids: list[str], sums: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d, s in zip(ids, sums, strict=True):
            out.setdefault(d, []).append(s)
        return out

    now = by_doc([c.document_id for c in chunks], [c.checksum for c in chunks])
    before = by_doc(prev.get("document_id", []), prev.get("checksum", []))
    report.added = sorted(set(now) - set(before))
    report.removed = sorted(set(before) - set(now))
    report.changed = sorted(d for d in set(now) & set(before) if now[d] != before[d])
    report.skipped = len(set(now) & set(before)) - len(report.changed)


def _same_rows(chunks: list[Chunk], prev: dict[str, list]) -> bool:
    return [tuple(getattr(c, k) for k in CHUNK_COLUMNS) for c in chunks] == list(
        zip(*(prev[k] for k in CHUNK_COLUMNS), strict=True)
    )


def _write_chunks(path: Path, chunks: list[Chunk]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: [getattr(c, k) for c in chunks] for k in CHUNK_COLUMNS}
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in cols.items()}), path)


def _prune(versions: Path, *, keep: int, live: str) -> None:
    done = sorted((p for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    for old in done[:-keep] if keep > 0 else []:
        if old.name != live:
            shutil.rmtree(old, ignore_errors=True)
