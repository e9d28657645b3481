"""Request ids: Serve's own where it set one, else the client's ``X-Request-ID``, else a new one.

Serve takes its id from the client's ``X-Request-ID`` too, so a request id is the client's to
choose and is never an owner's alone: what is kept under one (answered requests, feedback:
``state.conversations``) is keyed by (owner, request id).

A response carries one ``X-Request-ID``, the id of ``rag.metadata.request_id``: under Serve its HTTP
layer (the proxy, or the replica's direct ingress) adds it, so the app adds none
(:func:`id_headers`); the in-process app adds its own."""

from __future__ import annotations

import uuid

from fastapi import Request


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid:
        return rid
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # outside Serve (the in-process app, tests of the app alone)
        rid = ""
    request.state.id_by_serve = bool(rid)
    rid = rid or request.headers.get("x-request-id") or new_request_id()
    request.state.request_id = rid
    return rid


def id_headers(request: Request) -> dict[str, str]:
    """The ``X-Request-ID`` header a response of the app adds: none under Serve, whose HTTP layer
    adds the same id itself (two would read "id, id" to a client that joins repeated headers)."""
    rid = request_id(request)
    return {} if getattr(request.state, "id_by_serve", False) else {"X-Request-ID": rid}
