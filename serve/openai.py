"""The one SSE writer: a chat flow's ``chat.completion.chunk`` objects (:func:`flow.openai.chunks`)
as server-sent events, then ``[DONE]``, as OpenAI's streaming endpoint sends them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from flow.events import ChatEvent
from flow.openai import chunks


def sse(body: dict[str, Any]) -> str:
    """One server-sent event holding ``body`` as JSON."""
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def sse_stream(events: AsyncIterator[ChatEvent], *, request_id: str, model: str,
                     include_usage: bool = False) -> AsyncIterator[str]:
    """SSE lines in OpenAI's chunk format; the last data chunk carries ``rag`` (and, with
    ``include_usage``, a final chunk with empty ``choices`` carries ``usage`` and ``rag``)."""
    async for chunk in chunks(events, request_id=request_id, model=model, include_usage=include_usage):
        yield sse(chunk)
    yield SSE_DONE
