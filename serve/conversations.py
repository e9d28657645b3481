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
that feedback sent as soon as the answer is shown finds it, whichever replica it reaches. The
routes are added to ``serve.routes``' router (admitted to their access level: ``user``, the export
``admin``) like those of ``serve/documents.py``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import Depends, Query, Request
from pydantic import ConfigDict, Field

from deployments.errors import StageError
from flow.errors import FlowError, stage_unavailable
from flow.events import ChatEvent, Delta, Done
from flow.metrics import METRICS
from flow.requests import ChatRequest, StrictModel
from serve.admission import Caller, caller
from serve.querylog import question_of
from serve.responses import Conversation, ConversationDeleted, ConversationList, Feedback, FeedbackList
from serve.routetable import ADMIN, USER, RouteTable, json_body
from state.conversations import ANONYMOUS, COMMENT_MAX, TITLE_MAX, ConversationLimitError, SqlConversations

log = logging.getLogger("ray.serve")

# as in serve/documents.py: serve.routes adds them to its router.
ROUTES = RouteTable()
CONVERSATIONS = "/v1/conversations"
FEEDBACK = "/v1/feedback"
TURN_METADATA = ("request_id", "status", "degraded", "cached", "timings_ms", "answer")  # kept with a turn


class ConversationIn(StrictModel):
    title: str | None = Field(default=None, max_length=TITLE_MAX,
                              description="Shown in the list; empty: the first question becomes the title.")


class FeedbackIn(StrictModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"request_id": "3f2a9c...", "score": 1, "comment": "cited the right page"}]})
    request_id: str = Field(min_length=1, max_length=200, description="`rag.metadata.request_id` of the answer.")
    score: Literal[1, -1] = Field(description="1: a good answer, -1: a bad one.")
    comment: str | None = Field(default=None, max_length=COMMENT_MAX)


def store(request: Request) -> SqlConversations:
    return request.app.state.pipeline.governor.conversations


async def history(request: Request, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn`` (a method of :func:`store`) on the state threads; ``unavailable`` (retry shortly) when
    the database is down, ``conflict`` when it refused a new conversation past the key's limit."""
    try:
        return await request.app.state.pipeline.state(fn, *args)
    except StageError as e:
        code = ConversationLimitError.code
        if e.kind == "invalid" and e.detail.startswith(code + ":"):
            raise FlowError("conflict", e.detail.removeprefix(code + ":").strip(), code=code) from None
        raise stage_unavailable("the conversation store", e, code="state_unavailable") from None


def owner(who: Caller) -> str:
    return who.key_id or ANONYMOUS  # auth off: the anonymous owner


def not_found(conversation_id: str, param: str = "conversation_id") -> FlowError:
    return FlowError("not_found", f"no conversation {conversation_id!r} for this API key; GET /v1/conversations lists yours",
                     param=param, code="conversation_not_found")


# ---------------------------------------------------------------------------------------------
# chat turns


async def check_conversation(request: Request, body: ChatRequest) -> None:
    """``not_found`` before any work when ``rag.conversation_id`` is not the caller's."""
    cid = body.rag.conversation_id
    if cid is not None and not await history(request, store(request).exists, owner(caller(request)), cid):
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
        await request.app.state.pipeline.state(store(request).chat_done, owner(caller(request)), rid, cid, turn)
    except StageError as e:
        METRICS.errors.labels("state", "history_lost").inc()
        log.error(f"answer {rid} not recorded (feedback on it will be refused; conversation {cid}): {e}")


# ---------------------------------------------------------------------------------------------
# the routes


@ROUTES.get(CONVERSATIONS, access=USER, response_model=ConversationList)
async def conversations(request: Request, who: Caller = Depends(caller),
                        limit: int = Query(50, ge=1, le=500)) -> dict:
    return {"object": "list", "data": await history(request, store(request).list, owner(who), limit)}


@ROUTES.post(CONVERSATIONS, access=USER, status_code=201, response_model=Conversation)
async def conversation_create(request: Request, who: Caller = Depends(caller),
                              body: ConversationIn = json_body(ConversationIn)) -> dict:
    return await history(request, store(request).create, owner(who), body.title)


@ROUTES.get(CONVERSATIONS + "/{conversation_id}", access=USER, response_model=Conversation)
async def conversation(conversation_id: str, request: Request, who: Caller = Depends(caller)) -> dict:
    conv = await history(request, store(request).get, owner(who), conversation_id)
    if conv is None:
        raise not_found(conversation_id)
    return conv


@ROUTES.delete(CONVERSATIONS + "/{conversation_id}", access=USER, response_model=ConversationDeleted)
async def conversation_delete(conversation_id: str, request: Request, who: Caller = Depends(caller)) -> dict:
    if not await history(request, store(request).delete, owner(who), conversation_id):
        raise not_found(conversation_id)
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


@ROUTES.post(FEEDBACK, access=USER, status_code=201, response_model=Feedback)
async def feedback(request: Request, who: Caller = Depends(caller), body: FeedbackIn = json_body(FeedbackIn)) -> dict:
    stored = await history(request, store(request).put_feedback, owner(who), body.request_id, body.score,
                           body.comment)
    if stored is None:
        raise FlowError("not_found", f"no answer with request id {body.request_id!r} for this API key "
                        "(rag.metadata.request_id of an answer you were given; kept for "
                        "governor.conversations.retention_days)", param="request_id", code="request_not_found")
    METRICS.feedback.labels("up" if body.score == 1 else "down").inc()
    return stored


@ROUTES.get(FEEDBACK, access=ADMIN, response_model=FeedbackList)
async def feedback_export(request: Request, limit: int = Query(1000, ge=1, le=10000),
                          after: float | None = Query(None, description="Only feedback updated after this time "
                                                      "(seconds since the epoch: the last row's `updated`).")) -> dict:
    rows = await history(request, store(request).feedback, limit + 1, after)  # one more: whether a next page exists
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}
