"""Uploaded files into documents: markdown/text, HTML, PDF, DOCX, JSONL and Parquet.

One file gives one document (JSONL and Parquet: one per row) whose id is the file's name. The
text keeps the file's structure as markdown headings so that chunks carry a heading path for
citations: an HTML page's ``h1``-``h6``, a DOCX's ``Heading N`` paragraphs, a PDF's pages
(``Page 3``). HTML is reduced to its main text: scripts, styles, navigation, headers, footers,
asides and forms are dropped, and a page with a ``<main>`` or ``<article>`` is read from there.

Every reader raises :class:`indexing.documents.SourceError` naming the file and the problem; the
caller fails that file alone. The libraries are imported when a file of their kind is read.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from indexing.documents import TEXT_SUFFIXES, Document, SourceError, _row_to_doc, _title_of, jsonl_rows

HTML_SUFFIXES = {".html", ".htm"}
SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf", ".docx", ".jsonl", ".parquet"}
_DROP_HTML = ("script", "style", "noscript", "nav", "header", "footer", "aside", "form", "svg", "iframe", "template",
              "button", "select", "canvas", "object")
_DROP_ROLES = {"navigation", "banner", "contentinfo", "complementary", "search", "menu", "menubar"}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one file may hold (``documents.max_document_chars``, ``max_extracted_bytes``, ``max_pdf_pages``)."""

    max_chars: int = 2_000_000
    max_extracted_bytes: int = 64 * 1024 * 1024
    max_pdf_pages: int = 2_000


def suffix_of(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def supported(name: str) -> bool:
    return suffix_of(name) in SUFFIXES


def read_upload(name: str, data: bytes, *, domain: str, updated_at: str | None = None,
                limits: Limits = Limits()) -> Iterator[Document]:
    """The documents in one uploaded file called ``name`` (its base name; the id of a one-document
    file). Raises :class:`SourceError` when it cannot be read."""
    suffix = suffix_of(name)
    when = updated_at or datetime.now(UTC).isoformat(timespec="seconds")
    source = f"upload:{name}"

    def one(text: str, title: str, *, markdown: bool) -> Document:
        text = text.strip()
        if not text:
            raise SourceError(f"{name}: no text found in the file")
        if len(text) > limits.max_chars:
            raise SourceError(f"{name}: {len(text)} characters of text; the limit is {limits.max_chars} "
                              "(documents.max_document_chars)")
        return Document(id=name, text=text, title=title, source=source, domain=domain, updated_at=when,
                        markdown=markdown)

    if suffix in TEXT_SUFFIXES:
        text = _utf8(name, data)
        stem = name[: -len(suffix)] if suffix else name
        yield one(text, _title_of(text, stem), markdown=suffix in {".md", ".markdown"})
    elif suffix in HTML_SUFFIXES:
        title, text = html_text(data)
        yield one(text, title or _title_of(text, name[: -len(suffix)]), markdown=True)
    elif suffix == ".pdf":
        title, text = pdf_text(name, data, limits)
        yield one(text, title or name[: -len(suffix)], markdown=True)
    elif suffix == ".docx":
        title, text = docx_text(name, data, limits)
        yield one(text, title or _title_of(text, name[: -len(suffix)]), markdown=True)
    elif suffix == ".jsonl":
        yield from _jsonl(name, data, domain=domain, when=when, limits=limits)
    elif suffix == ".parquet":
        yield from _parquet(name, data, domain=domain, when=when, limits=limits)
    else:
        raise SourceError(f"{name}: unsupported file type {suffix or '(none)'!r}; accepted: {sorted(SUFFIXES)}")


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SourceError(f"{name}: not UTF-8 text (byte {e.start})") from None


def _checked_row(doc: Document, where: str, limits: Limits) -> Document:
    if len(doc.text) > limits.max_chars:
        raise SourceError(f"{where}: {len(doc.text)} characters of text; the limit is {limits.max_chars} "
                          "(documents.max_document_chars)")
    if not doc.text.strip():
        raise SourceError(f"{where}: row {doc.id!r} has empty text")
    return doc


def _jsonl(name: str, data: bytes, *, domain: str, when: str, limits: Limits) -> Iterator[Document]:
    docs = []
    for where, row in jsonl_rows(_utf8(name, data).splitlines(), name):
        docs.append(_checked_row(_row_to_doc(row, where=where, domain=domain, default_time=when), where, limits))
    if not docs:
        raise SourceError(f"{name}: no rows")
    yield from docs


def _parquet(name: str, data: bytes, *, domain: str, when: str, limits: Limits) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SourceError(f"{name}: not a readable Parquet file ({type(e).__name__})") from None
    if not rows:
        raise SourceError(f"{name}: no rows")
    for n, row in enumerate(rows):
        yield _checked_row(_row_to_doc(row, where=f"{name}:row {n}", domain=domain, default_time=when),
                           f"{name}:row {n}", limits)


# ---------------------------------------------------------------------------------------------
# HTML


def html_text(data: bytes | str) -> tuple[str, str]:
    """(title, main text as markdown): headings as ``#`` lines, paragraphs, list items and table rows
    as lines; scripts, styles, navigation, headers, footers, asides, forms and hidden parts dropped."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(list(_DROP_HTML)):
        tag.decompose()
    for tag in soup.find_all(True):
        if tag.decomposed:  # inside a part already dropped
            continue
        attrs = tag.attrs or {}
        role = str(attrs.get("role", "")).lower()
        style = str(attrs.get("style", "")).replace(" ", "").lower()
        if role in _DROP_ROLES or "hidden" in attrs or attrs.get("aria-hidden") == "true" or "display:none" in style:
            tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    lines: list[str] = []
    blocks = ("h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "tr", "dt", "dd", "figcaption",
              "caption")
    for el in root.find_all(blocks):
        if el.find_parent(blocks) is not None and el.name not in ("tr",):
            continue  # nested blocks are read with their parent
        text = " ".join(el.get_text(" ", strip=True).split()) if el.name != "pre" else el.get_text().strip()
        if el.name == "tr":
            text = " | ".join(" ".join(c.get_text(" ", strip=True).split()) for c in el.find_all(["td", "th"]))
        if not text:
            continue
        if el.name[0] == "h" and el.name[1:].isdigit():
            lines.append(f"{'#' * int(el.name[1])} {text}")
        elif el.name == "li":
            lines.append(f"- {text}")
        else:
            lines.append(text)
    if not lines:  # text outside any block element (a bare page)
        lines = [" ".join(root.get_text(" ", strip=True).split())]
    if not title:
        h1 = root.find("h1")
        title = h1.get_text(" ", strip=True) if h1 else ""
    return title, "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------
# PDF


def pdf_text(name: str, data: bytes, limits: Limits) -> tuple[str, str]:
    """(title from the document info, text with one ``## Page N`` heading per page with text)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise SourceError(f"{name}: the PDF is encrypted; upload an unencrypted copy")
        pages = reader.pages
        if len(pages) > limits.max_pdf_pages:
            raise SourceError(f"{name}: {len(pages)} pages; the limit is {limits.max_pdf_pages} (documents.max_pdf_pages)")
        parts, size = [], 0
        for n, page in enumerate(pages, 1):
            text = (page.extract_text() or "").strip()
            if text:
                parts.append(f"## Page {n}\n\n{text}")
                size += len(text)
                if size > limits.max_chars:
                    raise SourceError(f"{name}: over {limits.max_chars} characters of text by page {n} "
                                      "(documents.max_document_chars)")
        meta = reader.metadata
        title = str(meta.title).strip() if meta is not None and meta.title else ""
    except SourceError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        raise SourceError(f"{name}: not a readable PDF ({type(e).__name__})") from None
    if not parts:
        raise SourceError(f"{name}: no text in any of its {len(pages)} pages (a scan? text recognition is not done)")
    return title, "\n\n".join(parts)


# ---------------------------------------------------------------------------------------------
# DOCX


def docx_text(name: str, data: bytes, limits: Limits) -> tuple[str, str]:
    """(title from the ``Title`` paragraph or the core properties, text with ``Heading N``
    paragraphs as markdown headings and table rows as ``a | b`` lines)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            size = sum(i.file_size for i in z.infolist())
    except zipfile.BadZipFile:
        raise SourceError(f"{name}: not a DOCX file (not a zip archive)") from None
    if size > limits.max_extracted_bytes:
        raise SourceError(f"{name}: {size} bytes uncompressed; the limit is {limits.max_extracted_bytes} "
                          "(documents.max_extracted_bytes)")
    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        d = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SourceError(f"{name}: not a readable DOCX file ({type(e).__name__})") from None
    title = (d.core_properties.title or "").strip()
    lines: list[str] = []
    body = d.element.body
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for child in body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            p = Paragraph(child, d)
            text = p.text.strip()
            if not text:
                continue
            style = (p.style.name if p.style is not None else "") or ""
            if style == "Title":
                title = title or text
                lines.append(f"# {text}")
            elif style.startswith("Heading") and style[7:].strip().isdigit():
                lines.append(f"{'#' * min(6, int(style[7:].strip()) + 1)} {text}")
            else:
                lines.append(text)
        elif tag == "tbl":
            for row in Table(child, d).rows:
                cells = [c.text.strip() for c in row.cells]
                if any(cells):
                    lines.append(" | ".join(cells))
    return title, "\n\n".join(lines)
