"""Reading a source into documents: a folder of markdown/text, a JSONL file (BEIR ``corpus.jsonl``),
a Parquet file, or a folder of either.

``domain`` comes from the folder layout: a file at ``SOURCE/<domain>/.../file.md`` belongs to
``<domain>``; a file directly in ``SOURCE`` belongs to the source folder's own name (so the
project's ``docs/`` is the domain ``docs``). JSONL and Parquet rows may carry their own ``domain``
and ``updated_at`` (top level or in ``metadata``). A document's ``source`` is its file relative to
``SOURCE`` (a row's own ``source`` where it has one), never a path on this machine: clients see it.

A symbolic link in a source folder that leads outside it (to a file or a folder) is skipped, and
named in the ``skipped`` list the caller passes (the index build's report lists them): otherwise a
link to ``/etc/passwd`` or a home folder would be indexed and served. Links that stay inside the
source are read like the files they point to (folders behind links are not descended into).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

TEXT_SUFFIXES = {".md", ".markdown", ".txt", ".rst"}


class SourceError(ValueError):
    """The source cannot be read; the message names the file (and line) and the problem."""


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str
    title: str = ""
    source: str = ""
    domain: str = ""
    updated_at: str = ""  # ISO 8601, UTC
    markdown: bool = False


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _title_of(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def leaves(path: Path, root: Path) -> bool:
    """``path``, with every link on the way followed, is outside ``root`` (an absolute, resolved
    folder); a link loop counts as outside."""
    try:
        return not path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
        return True


def _target(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):
        return "(a link loop)"


def read_source(source: Path, *, skipped: list[str] | None = None) -> Iterator[Document]:
    """Yield every document in ``source``; raise :class:`SourceError` on unreadable input.
    ``skipped``: a list to which the path (relative to ``source``) of every link leading outside
    ``source`` is appended, with where it leads; such links are not read."""
    source = Path(source).expanduser().resolve()  # one spelling per file, so metadata is stable
    if not source.exists():
        raise SourceError(f"source {source} does not exist")
    if source.is_file():
        yield from _read_file(source, domain=source.parent.name, root=source.parent)
        return
    corpus = source / "corpus.jsonl"
    if corpus.is_file() and not leaves(corpus, source):  # a BEIR dataset folder
        yield from _read_jsonl(corpus, domain=source.name, label=corpus.name)
        return
    files, outside = [], []
    for p in sorted(source.rglob("*")):
        if any(s.startswith(".") for s in p.relative_to(source).parts):  # hidden inside the source only
            continue
        if leaves(p, source):
            outside.append(f"{p.relative_to(source).as_posix()} -> {_target(p)}")
            continue
        if p.is_file():
            files.append(p)
    if skipped is not None:
        skipped.extend(outside)
    readable = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES | {".jsonl", ".parquet"}]
    if not readable:
        raise SourceError(
            f"source {source} holds no readable file (markdown/text {sorted(TEXT_SUFFIXES)}, .jsonl, .parquet)"
            + (f"; links leading outside it are not followed: {outside[:5]}" if outside else "")
        )
    for p in readable:
        rel = p.relative_to(source)
        domain = rel.parts[0] if len(rel.parts) > 1 else source.resolve().name
        yield from _read_file(p, domain=domain, root=source)


def _read_file(path: Path, *, domain: str, root: Path) -> Iterator[Document]:
    suffix = path.suffix.lower()
    rel = path.relative_to(root).as_posix()  # the document's source as clients see it: never a server path
    if suffix == ".jsonl":
        yield from _read_jsonl(path, domain=domain, label=rel)
    elif suffix == ".parquet":
        yield from _read_parquet(path, domain=domain, label=rel)
    elif suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{path}: not UTF-8 text ({e})") from None
        yield Document(
            id=rel,
            text=text,
            title=_title_of(text, path.stem),
            source=rel,
            domain=domain,
            updated_at=_mtime(path),
            markdown=suffix in {".md", ".markdown"},
        )
    else:
        raise SourceError(f"{path}: unsupported file type {suffix!r}; use markdown/text, .jsonl or .parquet")


def _row_to_doc(row: dict, *, where: str, domain: str, default_time: str, source: str | None = None) -> Document:
    """``source``: the row's default source (its file, relative to the indexed folder); ``where``
    names the row in errors."""
    meta = row.get("metadata") or {}
    doc_id = row.get("_id", row.get("id", row.get("document_id")))
    if doc_id is None or str(doc_id) == "":
        raise SourceError(f"{where}: row has no id (expected '_id', 'id' or 'document_id')")
    text = row.get("text")
    if not isinstance(text, str):
        raise SourceError(f"{where}: row {doc_id!r} has no 'text' string")
    return Document(
        id=str(doc_id),
        text=text,
        title=str(row.get("title") or ""),
        source=str(row.get("source") or meta.get("source") or source or where.rsplit(":", 1)[0]),
        domain=str(row.get("domain") or meta.get("domain") or domain),
        updated_at=str(row.get("updated_at") or meta.get("updated_at") or default_time),
    )


def jsonl_rows(lines: Iterable[str], name: str) -> Iterator[tuple[str, dict]]:
    """``(where, row)`` for each non-blank line of a JSONL file called ``name`` (``where`` is
    ``name:line``); a line that is not one JSON object raises :class:`SourceError` naming it."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{name}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise SourceError(f"{name}:{n}: expected a JSON object per line")
        yield f"{name}:{n}", row


def _read_jsonl(path: Path, *, domain: str, label: str) -> Iterator[Document]:
    when = _mtime(path)
    with path.open(encoding="utf-8") as f:
        for where, row in jsonl_rows(f, str(path)):
            yield _row_to_doc(row, where=where, domain=domain, default_time=when, source=label)


def _read_parquet(path: Path, *, domain: str, label: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SourceError(f"{path}: not a readable Parquet file ({e})") from None
    when = _mtime(path)
    for n, row in enumerate(table.to_pylist()):
        yield _row_to_doc(row, where=f"{path}:row {n}", domain=domain, default_time=when, source=label)
