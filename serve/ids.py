"""Request ids: Serve's own where it set one, else the client's ``X-Request-ID``, else a new one.

Serve takes its id from the client's ``X-Request-ID`` too, so a request id is the client's to
choose and is never an owner's alone: what is kept under one (answered requests, feedback:
``deployments.conversations``) is keyed by (owner, request id)."""

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
    rid = rid or request.headers.get("x-request-id") or new_request_id()
    request.state.request_id = rid
    return rid
