"""Splitting documents into chunks that keep their heading path and source metadata.

Markdown is split at headings first; each section is then cut into windows of ``size`` words
overlapping by ``overlap`` words. A chunk's id is ``<document_id>#<n>`` (stable while the document
keeps its shape) and its checksum is the sha256 of what gets embedded, so an unchanged chunk is
recognised, and its vector reused, even if its position moves.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from indexing.documents import Document

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
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
        m = None if in_fence else _HEADING.match(line)
        if m:
            flush()
            level = len(m.group(1))
            path = [(lv, t) for lv, t in path if lv < level] + [(level, m.group(2))]
        else:
            body.append(line)
    flush()
    return out


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
                title=doc.title,
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
