"""Conversations and feedback (the chat page's API):

* ``GET /v1/conversations`` (``limit``), ``POST /v1/conversations`` ``{"title"}`` -> 201 (409
  ``conversation_limit_reached`` past ``governor.conversations.max_conversations``),
  ``GET /v1/conversations/{id}`` (with its turns), ``DELETE /v1/conversations/{id}`` (with the
  feedback on its turns): the caller's own (per API key; with auth off, one anonymous owner);
* ``rag.conversation_id`` on ``POST /v1/chat/completions``: the question and its answer are
  appended as a turn when the answer ends (:func:`recorded`); an unknown id is 404 before any work;
* ``POST /v1/feedback`` ``{"request_id", "score": 1 | -1, "comment"}``: on one of the caller's
  answers (``rag.metadata.request_id``, the caller's own even where another key used the same
  id), else 404; sending again replaces it;
* ``GET /v1/feedback`` (admin; ``limit``, ``after``): every key's feedback, the export.

All of it is kept in the state database (:mod:`state.conversations`, shared by every ingress
replica): every answered chat's request id is recorded there before its last chunk is sent, so
that feedback sent as soon as the answer is shown finds it, whichever replica it reaches. The routes are added to ``serve.routes``' router (admitted
by ``ObservedRoute``) like those of ``serve/documents.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict, Field

from state.conversations import ANONYMOUS, COMMENT_MAX, TITLE_MAX, ConversationLimitError
from deployments.errors import StageError
from serve.api import ChatRequest, _Body
from serve.errors import ApiError, stage_unavailable
from serve.events import ChatEvent, Delta, Done
from serve.metrics import METRICS
from serve.querylog import question_of
from serve.routetable import RouteTable
from state.conversations import SqlConversations

log = logging.getLogger("ray.serve")

# as in serve/documents.py: serve.routes adds them to its router.
ROUTES = RouteTable()
CONVERSATIONS = "/v1/conversations"
FEEDBACK = "/v1/feedback"
TURN_METADATA = ("request_id", "status", "degraded", "cached", "timings_ms", "answer")  # kept with a turn


class ConversationIn(_Body):
    title: str | None = Field(default=None, max_length=TITLE_MAX,
                              description="Shown in the list; empty: the first question becomes the title.")


class FeedbackIn(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"request_id": "3f2a9c...", "score": 1, "comment": "cited the right page"}]})
    request_id: str = Field(min_length=1, max_length=200, description="`rag.metadata.request_id` of the answer.")
    score: Literal[1, -1] = Field(description="1: a good answer, -1: a bad one.")
    comment: str | None = Field(default=None, max_length=COMMENT_MAX)


def store(request: Request) -> SqlConversations:
    return request.app.state.pipeline.governor.conversations


async def history(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` (a method of :func:`store`) on the state threads; 503 + Retry-After when the database
    is down, 409 when it refused a new conversation past the key's limit."""
    try:
        return await request.app.state.pipeline.state(fn, *args)
    except StageError as e:
        code = ConversationLimitError.code
        if e.kind == "invalid" and e.detail.startswith(code + ":"):
            raise ApiError(409, e.detail.removeprefix(code + ":").strip(), code=code) from None
        raise stage_unavailable("the conversation store", e, code="state_unavailable") from None


def owner(request: Request) -> str:
    return getattr(request.state, "key_id", None) or ANONYMOUS  # auth off: the anonymous owner


def not_found(conversation_id: str, param: str = "conversation_id") -> ApiError:
    return ApiError(404, f"no conversation {conversation_id!r} for this API key; GET /v1/conversations lists yours",
                    param=param, code="conversation_not_found")


# ---------------------------------------------------------------------------------------------
# chat turns


async def check_conversation(request: Request, body: ChatRequest) -> None:
    """404 before any work when ``rag.conversation_id`` is not the caller's."""
    cid = body.rag.conversation_id
    if cid is not None and not await history(request, store(request).exists, owner(request), cid):
        raise not_found(cid, "rag.conversation_id")


async def recorded(request: Request, body: ChatRequest, events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
    """``events`` passed on; when :class:`Done` comes, the answered request id (and, with
    ``rag.conversation_id``, the turn) is written to the state database before Done is passed on. A
    database that fails then costs the record, never the answer (logged)."""
    parts: list[str] = []
    try:
        async for ev in events:
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Done):
                await _record(request, body, "".join(parts), ev)
            yield ev
    finally:
        await events.aclose()


async def _record(request: Request, body: ChatRequest, answer: str, done: Done) -> None:
    meta = done.rag.get("metadata", {})
    rid = meta.get("request_id")
    if not rid:
        return
    cid = body.rag.conversation_id
    turn = None
    if cid is not None:
        turn = {"question": question_of(body) or "", "answer": answer,
                "rag": {"sources": done.rag.get("sources", []), "metadata": {k: meta[k] for k in TURN_METADATA if k in meta}}}
    try:
        await request.app.state.pipeline.state(store(request).chat_done, owner(request), rid, cid, turn)
    except StageError as e:
        METRICS.errors.labels("state", "history_lost").inc()
        log.error(f"answer {rid} not recorded (feedback on it will be refused; conversation {cid}): {e}")


# ---------------------------------------------------------------------------------------------
# the routes


@ROUTES.route("GET", CONVERSATIONS)
async def conversations(request: Request, limit: int = Query(50, ge=1, le=500)) -> dict:
    return {"object": "list", "data": await history(request, store(request).list, owner(request), limit)}


@ROUTES.route("POST", CONVERSATIONS, status_code=201)
async def conversation_create(body: ConversationIn, request: Request) -> JSONResponse:
    return JSONResponse(await history(request, store(request).create, owner(request), body.title), status_code=201)


@ROUTES.route("GET", CONVERSATIONS + "/{conversation_id}")
async def conversation(conversation_id: str, request: Request) -> dict:
    conv = await history(request, store(request).get, owner(request), conversation_id)
    if conv is None:
        raise not_found(conversation_id)
    return conv


@ROUTES.route("DELETE", CONVERSATIONS + "/{conversation_id}")
async def conversation_delete(conversation_id: str, request: Request) -> dict:
    if not await history(request, store(request).delete, owner(request), conversation_id):
        raise not_found(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@ROUTES.route("POST", FEEDBACK, status_code=201)
async def feedback(body: FeedbackIn, request: Request) -> JSONResponse:
    stored = await history(request, store(request).put_feedback, owner(request), body.request_id, body.score,
                           body.comment)
    if stored is None:
        raise ApiError(404, f"no answer with request id {body.request_id!r} for this API key (rag.metadata.request_id "
                       "of an answer you were given; kept for governor.conversations.retention_days)",
                       param="request_id", code="request_not_found")
    METRICS.feedback.labels("up" if body.score == 1 else "down").inc()
    return JSONResponse(stored, status_code=201)


@ROUTES.route("GET", FEEDBACK, admin=True)
async def feedback_export(request: Request, limit: int = Query(1000, ge=1, le=10000),
                          after: float | None = Query(None, description="Only feedback updated after this time "
                                                      "(seconds since the epoch: the last row's `updated`).")) -> dict:
    rows = await history(request, store(request).feedback, limit + 1, after)  # one more: whether a next page exists
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}
