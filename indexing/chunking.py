"""Splitting documents into chunks that keep their heading path and source metadata.

Markdown is split at headings first (ATX headings, ``#`` to ``######``, read with string methods in
time linear in the line; a line over :data:`MAX_HEADING_LINE` characters is body text, never a
heading); each section is then cut into windows of ``size`` words overlapping by ``overlap`` words.
A chunk carries at most :data:`MAX_TITLE` characters of its document's title. A chunk's id is
``<document_id>#<n>`` (stable while the document keeps its shape) and its checksum is the sha256 of
what gets embedded, so an unchanged chunk is recognised, and its vector reused, even if its position
moves.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from indexing.documents import Document

# A heading's text and the document's title ride along in every chunk of their section (embedded and
# BM25-indexed): a longer heading line is body text, a longer title is cut to this length.
MAX_HEADING_LINE = 300  # characters
MAX_TITLE = 300  # characters
_FENCE = re.compile(r"^\s*(```|~~~)")


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    document_id: str
    text: str
    title: str
    heading_path: str  # "Scaling > Adding GPU replicas"
    source: str
    domain: str
    updated_at: str
    checksum: str

    @property
    def embed_text(self) -> str:
        """What is embedded and BM25-indexed: title and heading path give a chunk its context."""
        return "\n".join(p for p in (self.title, self.heading_path, self.text) if p)


def _sections(doc: Document) -> list[tuple[str, str]]:
    """(heading path, body) pairs. Headings inside fenced code blocks are body text."""
    if not doc.markdown:
        return [("", doc.text)]
    out: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    in_fence = False

    def flush() -> None:
        text = "\n".join(body).strip()
        if text:
            out.append((" > ".join(t for _, t in path), text))
        body.clear()

    for line in doc.text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        heading = None if in_fence else _heading(line)
        if heading:
            flush()
            level, title = heading
            path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
        else:
            body.append(line)
    flush()
    return out


def _heading(line: str) -> tuple[int, str] | None:
    """(level, title) of an ATX heading line, else None: one to six ``#``, whitespace, the title, and
    optional closing ``#``s, surrounding whitespace stripped (the same headings and titles as the
    regex ``^(#{1,6})\\s+(.+?)\\s*#*\\s*$``, whose backtracking is cubic in a run of spaces, but in
    one pass of string methods)."""
    if not line.startswith("#") or len(line) > MAX_HEADING_LINE:
        return None
    rest = line.lstrip("#")
    level = len(line) - len(rest)
    if level > 6 or not rest[:1].isspace():
        return None
    text = rest.lstrip()
    if not text:  # only whitespace after the hashes: the title is its last character, as the regex had it
        return (level, rest[-1]) if len(rest) > 1 else None
    core = text.rstrip().rstrip("#").rstrip()  # without the closing hashes and the whitespace around them
    return level, text[: max(1, len(core))]


def chunk_document(doc: Document, *, size: int, overlap: int) -> list[Chunk]:
    if size <= 0:
        raise ValueError(f"chunk size must be > 0 words, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be in [0, size={size}) words, got {overlap}")
    chunks: list[Chunk] = []
    for heading, body in _sections(doc):
        words = body.split()
        step = size - overlap
        starts = range(0, max(len(words) - overlap, 1), step) if len(words) > size else [0]
        for s in starts:
            text = " ".join(words[s : s + size])
            c = Chunk(
                id=f"{doc.id}#{len(chunks)}",
                document_id=doc.id,
                text=text,
                title=doc.title[:MAX_TITLE],
                heading_path=heading,
                source=doc.source,
                domain=doc.domain,
                updated_at=doc.updated_at,
                checksum="",
            )
            chunks.append(_with_checksum(c))
    return chunks


def _with_checksum(c: Chunk) -> Chunk:
    from dataclasses import replace

    return replace(c, checksum=hashlib.sha256(c.embed_text.encode()).hexdigest())
