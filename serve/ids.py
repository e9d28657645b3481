"""Request ids: Serve's own where it set one, else the client's ``X-Request-ID``, else a new one."""

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
