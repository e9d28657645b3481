"""OpenAI's shapes of a chat flow's events: one ``chat.completion`` object (:func:`completion`), or
its ``chat.completion.chunk`` objects in order (:func:`chunks`: the last one with a choice carries
``rag``; with ``include_usage``, a final chunk with empty ``choices`` carries ``usage`` and ``rag``).
How they are sent (a JSON body, server-sent events) is the HTTP layer's (``serve/openai.py``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from flow.events import ChatEvent, Delta, Done


async def completion(events: AsyncIterator[ChatEvent], *, request_id: str, model: str) -> dict[str, Any]:
    parts: list[str] = []
    logprobs: list[dict[str, Any]] | None = None
    done: Done | None = None
    async for ev in events:
        if isinstance(ev, Delta):
            parts.append(ev.text)
            if ev.logprobs is not None:
                logprobs = (logprobs or []) + ev.logprobs
        else:
            done = ev
    assert done is not None, "a chat flow ends with Done"
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "finish_reason": done.finish_reason,
                     "logprobs": {"content": logprobs} if logprobs is not None else None}],
        "usage": done.usage,
        "rag": done.rag,
    }


async def chunks(events: AsyncIterator[ChatEvent], *, request_id: str, model: str,
                 include_usage: bool = False) -> AsyncIterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of ``events``: the assistant's role first, one per
    :class:`Delta`, then the finish (with ``rag``, or followed by the usage chunk)."""
    cid, created = f"chatcmpl-{request_id}", int(time.time())

    def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None, **extra: Any) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                             "logprobs": {"content": logprobs} if logprobs is not None else None}], **extra}

    yield chunk({"role": "assistant", "content": ""})
    async for ev in events:
        if isinstance(ev, Delta):
            yield chunk({"content": ev.text}, logprobs=ev.logprobs)
            continue
        if include_usage:
            yield chunk({}, ev.finish_reason)
            yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": ev.usage, "rag": ev.rag}
        else:
            yield chunk({}, ev.finish_reason, rag=ev.rag)
