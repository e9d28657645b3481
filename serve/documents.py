"""The documents API and index operations (every route here is an admin's):

* ``POST /v1/documents``: JSON ``{"documents": [{"id", "title", "text", "metadata"}], "domain"}`` or a
  multipart upload (field ``files``, one or more; optional field ``domain``) -> ``202 {"job_id"}``;
* ``DELETE /v1/documents/{document_id}`` -> ``202 {"job_id"}``;
* ``GET /v1/documents``: what the live index version holds, paged (``limit``, ``after``);
* ``GET /v1/jobs``, ``GET /v1/jobs/{job_id}``: ingest jobs (:mod:`deployments.ingest`);
* ``GET /v1/index``, ``POST /v1/index/rollback``: versions kept, the live one, rollback.

A request is checked here (types, sizes, duplicate ids: ``unsupported``, ``too_large``, ``invalid``,
each naming what is wrong)
and written as a job (its files spooled to ``documents.spool_dir``, its row in the state database);
the job runs later, outside the request. Every ingress replica holds an
:class:`deployments.ingest.IngestService` over the shared jobs: whichever replica is free claims the
next job (one runs at a time, service-wide) and builds it as a Ray task (in ``serve.local``, in a
thread).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path, PurePosixPath, PureWindowsPath
from collections.abc import Callable
from typing import Any

from fastapi import Depends, Query, Request, Response
from pydantic import Field, ValidationError

from deployments.ingest import IngestService
from flow.calls import state_call
from flow.errors import FlowError
from flow.requests import StrictModel
from indexing.formats import SUFFIXES, supported
from indexing.store import IndexBuildError, RollbackError, list_versions, live_documents, rollback
from serve.admission import DOCUMENTS, Caller, caller
from serve.responses import DocumentList, IndexRollback, IndexVersions, Job, JobAccepted, JobList
from serve.routetable import ADMIN, RouteTable, json_body
from state.jobs import STATUSES

# serve.routes adds them to its router, so that they are admitted and served by every app make_app
# builds, like the routes declared there. Every route here is an admin's.
ROUTES = RouteTable()
METADATA_KEYS = ("domain", "source", "updated_at")


class DocumentIn(StrictModel):
    id: str = Field(min_length=1, max_length=512)
    title: str = Field(default="", max_length=1000)
    text: str
    metadata: dict[str, str] = Field(default_factory=dict)


class DocumentsIn(StrictModel):
    documents: list[DocumentIn] = Field(min_length=1)
    domain: str | None = Field(default=None, min_length=1, max_length=200)


class RollbackIn(StrictModel):
    version: str = Field(min_length=1, max_length=200)


# ---------------------------------------------------------------------------------------------
# where the jobs are


def _cfg(request: Request):
    return request.app.state.pipeline.cfg


def service(request: Request) -> IngestService:
    """This process's job service (:meth:`flow.pipeline.Pipeline.ingest`, started on first use)."""
    return request.app.state.pipeline.ingest()


async def ingest_call(request: Request, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """``fn`` (a method of :func:`service`) on the state threads: ``unavailable`` (retry shortly) when
    the jobs cannot be reached."""
    return await state_call(request.app.state.pipeline, "the ingest jobs", fn, *args, timeout=timeout)


def _refresh_local(request: Request) -> None:
    retriever = getattr(request.app.state.pipeline.stages, "retriever", None)
    if hasattr(retriever, "refresh"):  # the in-process app has no watcher of its own
        retriever.refresh()


# ---------------------------------------------------------------------------------------------
# uploads


def too_large(message: str, param: str, code: str) -> FlowError:
    return FlowError("too_large", message, param=param, code=code)


def _duplicates(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    return sorted({i for i in ids if i in seen or seen.add(i)})


def _base_name(name: str) -> str:
    """A client's file name without any folder part (never a path on this machine)."""
    return PurePosixPath(PureWindowsPath(name).name).name.strip()


async def _json_upload(request: Request) -> tuple[list[dict], str | None]:
    d = _cfg(request).documents
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        raise FlowError("invalid", "the body is not valid JSON", param="body", code="invalid_json") from None
    if isinstance(body, dict) and isinstance(body.get("documents"), list) and len(body["documents"]) > d.max_documents:
        raise too_large(f"documents: {len(body['documents'])} documents in one request; the limit is "
                        f"{d.max_documents} (documents.max_documents)", "documents", "too_many_documents")
    try:
        req = DocumentsIn.model_validate(body)
    except ValidationError as e:
        errs = e.errors()
        where = ".".join(str(p) for p in errs[0]["loc"]) or "body"
        detail = "; ".join(f"{'.'.join(str(p) for p in x['loc']) or 'body'}: {x['msg']}" for x in errs[:5])
        raise FlowError("invalid", f"{len(errs)} invalid field(s): {detail}", param=where, code="invalid_value") from None
    dup = _duplicates([doc.id for doc in req.documents])
    if dup:
        raise FlowError("invalid", f"duplicate document ids in one request: {dup[:20]}; each id may appear once",
                        param="documents.id", code="duplicate_document_ids")
    problems = []
    for n, doc in enumerate(req.documents):
        if len(doc.text) > d.max_document_chars:
            raise too_large(f"documents[{n}] ({doc.id!r}): {len(doc.text)} characters; the limit is "
                            f"{d.max_document_chars} (documents.max_document_chars)", f"documents.{n}.text",
                            "document_too_large")
        if not doc.text.strip():
            problems.append(f"documents[{n}] ({doc.id!r}): text is empty")
        unknown = sorted(set(doc.metadata) - set(METADATA_KEYS))
        if unknown:
            problems.append(f"documents[{n}] ({doc.id!r}): unknown metadata keys {unknown}; accepted: "
                            f"{list(METADATA_KEYS)}")
    if problems:
        raise FlowError("invalid", f"{len(problems)} invalid document(s): " + "; ".join(problems[:10]), param="documents",
                        code="invalid_value")
    return [doc.model_dump() for doc in req.documents], req.domain


async def _multipart_upload(request: Request) -> tuple[list[tuple[str, bytes]], str | None]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    d = _cfg(request).documents
    try:
        form = await request.form(max_files=d.max_files + 1, max_fields=100)
    except MultiPartException as e:
        msg = str(e)
        if "files" in msg.lower():
            raise too_large(f"files: more than {d.max_files} files in one upload; the limit is {d.max_files} "
                            "(documents.max_files)", "files", "too_many_files") from None
        raise FlowError("invalid", f"the multipart body cannot be read: {msg}", param="body", code="invalid_multipart") from None
    try:
        unknown = sorted({k for k in form.keys() if k not in ("files", "domain")})
        if unknown:
            raise FlowError("invalid", f"unknown form fields {unknown}; send the files as `files` (repeat it for each) and "
                            "optionally `domain`", param=unknown[0], code="unknown_field")
        uploads = form.getlist("files")
        if not uploads:
            raise FlowError("invalid", "no files: send one or more files in the form field `files`", param="files",
                            code="missing_files")
        if any(not isinstance(u, UploadFile) for u in uploads):
            raise FlowError("invalid", "`files` must be file parts (with a filename), not text fields", param="files",
                            code="invalid_value")
        if len(uploads) > d.max_files:
            raise too_large(f"files: {len(uploads)} files in one upload; the limit is {d.max_files} "
                            "(documents.max_files)", "files", "too_many_files")
        names = [_base_name(u.filename or "") for u in uploads]
        if any(not n for n in names):
            raise FlowError("invalid", "every file needs a file name (its document id)", param="files", code="invalid_value")
        bad = [n for n in names if not supported(n)]
        if bad:
            raise FlowError("unsupported", f"unsupported file type: {bad[:10]}; accepted: {sorted(SUFFIXES)}", param="files",
                            code="unsupported_file_type")
        dup = _duplicates(names)
        if dup:
            raise FlowError("invalid", f"duplicate document ids in one request (file names): {dup[:20]}", param="files",
                            code="duplicate_document_ids")
        files = [(n, await u.read()) for n, u in zip(names, uploads, strict=True)]
        domain = form.get("domain")
        if domain is not None and (not isinstance(domain, str) or not domain.strip()):
            raise FlowError("invalid", "domain must be a non-empty text field", param="domain", code="invalid_value")
        return files, domain
    finally:
        await form.close()


def _accepted(job: dict[str, Any], response: Response) -> dict[str, Any]:
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    return {"job_id": job["id"], "object": "ingest.job", "status": job["status"], "url": f"/v1/jobs/{job['id']}"}


@ROUTES.post(DOCUMENTS, access=ADMIN, status_code=202, response_model=JobAccepted)
async def upload(request: Request, response: Response, who: Caller = Depends(caller)) -> dict:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    documents, files = None, None
    if kind == "application/json":
        documents, domain = await _json_upload(request)
    elif kind == "multipart/form-data":
        files, domain = await _multipart_upload(request)
    else:
        raise FlowError("unsupported", f"Content-Type {kind or '(none)'!r} is not accepted; send application/json "
                        "({\"documents\": [...]}) or multipart/form-data (field `files`)", param="content-type",
                        code="unsupported_media_type")
    job_id = f"job_{uuid.uuid4().hex[:24]}"
    job = await ingest_call(request, service(request).submit, job_id, "upsert", documents, files, None, domain,
                            who.key_id, timeout=_cfg(request).http.timeouts.ingest_submit)
    return _accepted(job, response)


@ROUTES.delete(DOCUMENTS + "/{document_id:path}", access=ADMIN, status_code=202, response_model=JobAccepted)
async def delete(document_id: str, request: Request, response: Response, who: Caller = Depends(caller)) -> dict:
    root = Path(_cfg(request).indexing.dir)
    _, docs = await asyncio.to_thread(_documents_of, request, root)
    if not any(d["id"] == document_id for d in docs):
        pending = await ingest_call(request, service(request).pending_document_ids)
        if document_id not in pending:
            raise FlowError("not_found", f"no document {document_id!r} in the live index (nor in a queued upload); "
                            "GET /v1/documents lists them", param="document_id", code="document_not_found")
    job = await ingest_call(request, service(request).submit, f"job_{uuid.uuid4().hex[:24]}", "delete", None, None,
                            [document_id], None, who.key_id)
    return _accepted(job, response)


def _documents_of(request: Request, root: Path) -> tuple[str | None, list[dict[str, Any]]]:
    """The live version's documents, kept per version in this replica (a version never changes)."""
    from indexing.store import current_name

    live = current_name(root)
    cache = getattr(request.app.state, "documents_cache", None)
    if cache is not None and cache[0] == (str(root), live):
        return live, cache[1]
    try:
        version, docs = live_documents(root)
    except IndexBuildError:
        raise FlowError("unavailable", "the live index version cannot be read; see GET /v1/index",
                        code="index_unavailable", retry_after_s=5) from None
    request.app.state.documents_cache = ((str(root), version), docs)
    return version, docs


@ROUTES.get(DOCUMENTS, access=ADMIN, response_model=DocumentList)
async def documents(request: Request, limit: int = Query(100, ge=1), after: str | None = None) -> dict:
    cap = _cfg(request).documents.max_page_size
    if limit > cap:
        raise FlowError("invalid", f"limit={limit}: at most {cap} (documents.max_page_size)", param="limit",
                        code="invalid_value")
    version, docs = await asyncio.to_thread(_documents_of, request, Path(_cfg(request).indexing.dir))
    start = 0
    if after is not None:
        import bisect

        start = bisect.bisect_right([d["id"] for d in docs], after)
    page = docs[start: start + limit]
    return {"object": "list", "version": version, "total": len(docs), "data": page,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(docs)}


# ---------------------------------------------------------------------------------------------
# jobs


@ROUTES.get("/v1/jobs", access=ADMIN, response_model=JobList)
async def jobs(request: Request, limit: int = Query(20, ge=1), status: str | None = None,
               before: int | None = Query(None, ge=1)) -> dict:
    cap = _cfg(request).documents.max_page_size
    if limit > cap:
        raise FlowError("invalid", f"limit={limit}: at most {cap} (documents.max_page_size)", param="limit",
                        code="invalid_value")
    if status is not None and status not in STATUSES:
        raise FlowError("invalid", f"status={status!r}: one of {list(STATUSES)}", param="status", code="invalid_value")
    rows = await ingest_call(request, service(request).jobs, limit + 1, status, before)
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


@ROUTES.get("/v1/jobs/{job_id}", access=ADMIN, response_model=Job)
async def job(job_id: str, request: Request) -> dict:
    row = await ingest_call(request, service(request).job, job_id)
    if row is None:
        raise FlowError("not_found", f"no job {job_id!r} (finished jobs are kept up to documents.keep_jobs); GET /v1/jobs "
                        "lists them", param="job_id", code="job_not_found")
    return row


# ---------------------------------------------------------------------------------------------
# index operations


def _settings(request: Request):
    from indexing.jobs import settings_from_config

    return settings_from_config(_cfg(request))


def _model(m: dict[str, Any]) -> dict[str, Any]:
    """A manifest's model without the server's folder (only the model's own name)."""
    return {"name": PurePosixPath(str(m.get("name", ""))).name, "dtype": m.get("dtype"),
            "checksum": m.get("checksum")}


@ROUTES.get("/v1/index", access=ADMIN, response_model=IndexVersions)
async def index(request: Request) -> dict:
    from indexing.store import same_embedder

    cfg = _cfg(request)
    settings = await asyncio.to_thread(_settings, request)
    live, versions = await asyncio.to_thread(list_versions, Path(cfg.indexing.dir))
    out = []
    for v in versions:
        if "error" in v:
            out.append({"name": v["name"], "live": v["live"], "error": v["error"], "rollback": False})
            continue
        same = same_embedder({"model": v["model"]}, settings)
        out.append({**v, "model": _model(v["model"]), "same_embedder": same, "rollback": same and not v["live"]})
    return {"object": "index", "live": live, "versions": out, "keep_versions": cfg.indexing.keep_versions,
            "embedder": _model({"name": settings.model, "dtype": settings.embedder_dtype,
                                "checksum": settings.model_checksum}),
            "documents": next((v["documents"] for v in out if v.get("live")), 0),
            "chunks": next((v["chunks"] for v in out if v.get("live")), 0)}


@ROUTES.post("/v1/index/rollback", access=ADMIN, response_model=IndexRollback)
async def index_rollback(request: Request, body: RollbackIn = json_body(RollbackIn)) -> dict:
    cfg = _cfg(request)
    settings = await asyncio.to_thread(_settings, request)
    try:
        previous, live = await asyncio.to_thread(rollback, Path(cfg.indexing.dir), body.version, settings)
    except RollbackError as e:
        kind = "not_found" if e.code == "version_not_found" else "conflict"
        raise FlowError(kind, str(e), param="version", code=e.code) from None
    except IndexBuildError:
        raise FlowError("conflict", "an index build is running (a job or `ragraph index`); roll back once it ends "
                        "(GET /v1/jobs)", param="version", code="index_busy", retry_after_s=10) from None
    await asyncio.to_thread(_refresh_local, request)
    return {"object": "index.rollback", "previous": previous, "live": live, "changed": previous != live}
