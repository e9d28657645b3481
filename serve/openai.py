"""OpenAI's response shapes for a chat flow's events: one ``chat.completion`` body, or the one SSE
writer (``chat.completion.chunk`` lines, the last data chunk carrying ``rag``, then ``[DONE]``)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from serve.events import ChatEvent, Delta, Done


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


def sse(body: dict[str, Any]) -> str:
    """One server-sent event holding ``body`` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(events: AsyncIterator[ChatEvent], *, request_id: str, model: str,
                     include_usage: bool = False) -> AsyncIterator[str]:
    """SSE lines in OpenAI's chunk format; the last data chunk carries ``rag`` (and, with
    ``include_usage``, a final chunk with empty ``choices`` carries ``usage`` and ``rag``)."""
    cid, created = f"chatcmpl-{request_id}", int(time.time())

    def chunk(delta: dict, finish: str | None = None, logprobs: list | None = None, **extra: Any) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                 "logprobs": {"content": logprobs} if logprobs is not None else None}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for ev in events:
        if isinstance(ev, Delta):
            yield chunk({"content": ev.text}, logprobs=ev.logprobs)
            continue
        if include_usage:
            yield chunk({}, ev.finish_reason)
            yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": ev.usage, "rag": ev.rag})
        else:
            yield chunk({}, ev.finish_reason, rag=ev.rag)
    yield SSE_DONE
