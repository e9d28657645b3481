"""Uploaded files into documents: markdown/text, HTML, PDF, DOCX, JSONL and Parquet.

One file gives one document (JSONL and Parquet: one per row) whose id is the file's name. The
text keeps the file's structure as markdown headings so that chunks carry a heading path for
citations: an HTML page's ``h1``-``h6``, a DOCX's ``Heading N`` paragraphs, a PDF's pages
(``Page 3``). HTML is reduced to its main text: scripts, styles, navigation, headers, footers,
asides and forms are dropped, and a page with a ``<main>`` or ``<article>`` is read from there.

Every reader raises :class:`indexing.documents.SourceError` naming the file and the problem; the
caller fails that file alone. The libraries are imported when a file of their kind is read.

What a file may make a reader do is capped (:class:`Limits`, from ``documents.*``), each cap checked
before the work it bounds: an HTML page's elements (start tags counted before it is parsed) and
nesting depth, a PDF's pages and the content-stream bytes each page and the whole file hand to the
text extractor (measured, each stream decoded once, before any text is extracted), a DOCX's
uncompressed size, the rows of a JSONL or Parquet file, the characters of a document.
"""

from __future__ import annotations

import io
import re
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


_BLOCKS = ("h1", "h2", "h3", "h4", "h5", "h6", "p", "li", "pre", "blockquote", "tr", "dt", "dd", "figcaption",
           "caption")
_START_TAG = re.compile(rb"<[A-Za-z]")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one file may hold: ``documents.max_document_chars``, ``max_extracted_bytes``,
    ``max_pdf_pages``, ``max_pdf_page_content_bytes``, ``max_pdf_content_bytes``, ``max_html_elements``,
    ``max_html_depth``, ``max_rows_per_file``."""

    max_chars: int = 2_000_000
    max_extracted_bytes: int = 64 * 1024 * 1024
    max_pdf_pages: int = 2_000
    max_pdf_page_content_bytes: int = 4 * 1024 * 1024
    max_pdf_content_bytes: int = 32 * 1024 * 1024
    max_html_elements: int = 100_000
    max_html_depth: int = 256
    max_rows: int = 10_000

    @classmethod
    def from_config(cls, d) -> Limits:
        """The limits of a :class:`common.config.DocumentsConfig`."""
        return cls(max_chars=d.max_document_chars, max_extracted_bytes=d.max_extracted_bytes,
                   max_pdf_pages=d.max_pdf_pages, max_pdf_page_content_bytes=d.max_pdf_page_content_bytes,
                   max_pdf_content_bytes=d.max_pdf_content_bytes, max_html_elements=d.max_html_elements,
                   max_html_depth=d.max_html_depth, max_rows=d.max_rows_per_file)


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
        title, text = html_text(data, name=name, limits=limits)
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


def _too_many_rows(name: str, n: int, limits: Limits) -> SourceError:
    return SourceError(f"{name}: {n} rows; the limit is {limits.max_rows} rows per file (documents.max_rows_per_file)")


def _jsonl(name: str, data: bytes, *, domain: str, when: str, limits: Limits) -> Iterator[Document]:
    lines = _utf8(name, data).splitlines()
    rows = sum(1 for line in lines if line.strip())
    if rows > limits.max_rows:
        raise _too_many_rows(name, rows, limits)
    docs = []
    for where, row in jsonl_rows(lines, name):
        docs.append(_checked_row(_row_to_doc(row, where=where, domain=domain, default_time=when), where, limits))
    if not docs:
        raise SourceError(f"{name}: no rows")
    yield from docs


def _parquet(name: str, data: bytes, *, domain: str, when: str, limits: Limits) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(io.BytesIO(data))
        if f.metadata.num_rows > limits.max_rows:  # from the footer, before any row is read
            raise _too_many_rows(name, f.metadata.num_rows, limits)
        rows = f.read().to_pylist()
    except (SourceError, MemoryError):
        raise
    except Exception as e:  # pyarrow raises several types for a bad file
        raise SourceError(f"{name}: not a readable Parquet file ({type(e).__name__})") from None
    if not rows:
        raise SourceError(f"{name}: no rows")
    for n, row in enumerate(rows):
        yield _checked_row(_row_to_doc(row, where=f"{name}:row {n}", domain=domain, default_time=when),
                           f"{name}:row {n}", limits)


# ---------------------------------------------------------------------------------------------
# HTML


def _dropped(tag) -> bool:
    """A part of a page that is not its text: scripts, navigation, forms, hidden elements."""
    if tag.name in _DROP_HTML:
        return True
    attrs = tag.attrs or {}
    role = str(attrs.get("role", "")).lower()
    style = str(attrs.get("style", "")).replace(" ", "").lower()
    return role in _DROP_ROLES or "hidden" in attrs or attrs.get("aria-hidden") == "true" or "display:none" in style


def html_text(data: bytes | str, *, name: str = "page.html", limits: Limits = Limits()) -> tuple[str, str]:
    """(title, main text as markdown): headings as ``#`` lines, paragraphs, list items and table rows
    as lines; scripts, styles, navigation, headers, footers, asides, forms and hidden parts dropped.
    A page with more than ``limits.max_html_elements`` elements or nested deeper than
    ``limits.max_html_depth`` raises :class:`SourceError`; the work is linear in the elements."""
    from bs4 import BeautifulSoup

    raw = data.encode() if isinstance(data, str) else data
    starts = 0
    for _ in _START_TAG.finditer(raw):  # an upper bound of the elements, counted before parsing
        starts += 1
        if starts > limits.max_html_elements:
            raise SourceError(f"{name}: over {limits.max_html_elements} HTML elements; the limit is "
                              f"{limits.max_html_elements} (documents.max_html_elements)")
    soup = BeautifulSoup(data, "lxml")
    # one pass in document order (a parent before its children): depth, whether a dropped part holds
    # the element, whether a block holds it (a nested block is read with its parent)
    seen: dict[int, tuple[int, bool, bool]] = {}
    drop, in_block = [], set()
    for n, tag in enumerate(soup.find_all(True), 1):
        depth, parent_dropped, parent_in_block = seen.get(id(tag.parent), (0, False, False))
        depth += 1
        if depth > limits.max_html_depth or n > limits.max_html_elements:
            what = (f"elements nested {depth} deep; the limit is {limits.max_html_depth} (documents.max_html_depth)"
                    if depth > limits.max_html_depth else
                    f"over {limits.max_html_elements} HTML elements; the limit is {limits.max_html_elements} "
                    "(documents.max_html_elements)")
            raise SourceError(f"{name}: {what}")
        dropped = parent_dropped or _dropped(tag)
        if dropped and not parent_dropped:
            drop.append(tag)
        held = parent_in_block or tag.parent.name in _BLOCKS
        if held:
            in_block.add(id(tag))
        seen[id(tag)] = (depth, dropped, held)
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in drop:  # the outermost of each dropped part
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    lines: list[str] = []
    for el in root.find_all(_BLOCKS):
        if id(el) in in_block and el.name != "tr":
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
        _check_pdf_content(name, pages, limits)
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


def _check_pdf_content(name: str, pages, limits: Limits) -> None:
    """Raise :class:`SourceError` when a page, or the whole file, hands the text extractor more
    content-stream bytes (decoded; its form XObjects included) than the limits allow. Pages may share
    a stream: each is decoded once, and counted for every page that draws it."""
    from pypdf.generic import ArrayObject, IndirectObject, StreamObject

    sizes: dict[tuple[int, int], int] = {}

    def size(ref) -> int:
        key = (ref.idnum, ref.generation) if isinstance(ref, IndirectObject) else None
        if key is not None and key in sizes:
            return sizes[key]
        obj = ref.get_object()
        n = len(obj.get_data()) if isinstance(obj, StreamObject) else 0
        if key is not None:
            sizes[key] = n
        return n

    def streams(page):
        contents = page.get("/Contents")
        if contents is not None:
            resolved = contents.get_object()
            yield from (resolved if isinstance(resolved, ArrayObject) else [contents])
        resources = page.get("/Resources")
        xobjects = resources.get_object().get("/XObject") if resources is not None else None
        for ref in (xobjects.get_object().values() if xobjects is not None else ()):
            obj = ref.get_object()
            if isinstance(obj, StreamObject) and obj.get("/Subtype") == "/Form":
                yield ref

    total = 0
    for n, page in enumerate(pages, 1):
        on_page = sum(size(ref) for ref in streams(page))
        if on_page > limits.max_pdf_page_content_bytes:
            raise SourceError(f"{name}: page {n} has {on_page} bytes of content streams; the limit is "
                              f"{limits.max_pdf_page_content_bytes} per page (documents.max_pdf_page_content_bytes)")
        total += on_page
        if total > limits.max_pdf_content_bytes:
            raise SourceError(f"{name}: over {limits.max_pdf_content_bytes} bytes of content streams by page {n} "
                              f"(pages may draw one stream many times); the limit is {limits.max_pdf_content_bytes} "
                              "(documents.max_pdf_content_bytes)")


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
