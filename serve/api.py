"""HTTP request and response models, and errors in OpenAI's format.

The chat endpoint accepts what OpenAI's ``/v1/chat/completions`` accepts (the parameters the
``openai`` client sends), plus one extension body field, ``rag``. Unknown parameters are refused
with a 400 that names them, as OpenAI does.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.retriever import STRATEGIES


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"] = Field(
        description="'system' (or 'developer'), 'user' or 'assistant'."
    )
    content: str | list[dict[str, Any]] = Field(description="Text, or a list of {'type': 'text', 'text': ...} parts.")
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]]) -> str:
        if isinstance(v, str):
            return v
        texts = []
        for i, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)

    @property
    def text(self) -> str:
        assert isinstance(self.content, str)
        return self.content


class RagFilters(_Body):
    domains: list[str] | None = Field(default=None, description="Only passages from these domains.")
    updated_after: str | None = Field(default=None, description="ISO 8601 date; inclusive.")
    updated_before: str | None = Field(default=None, description="ISO 8601 date; inclusive.")


class RagOptions(_Body):
    enabled: bool = Field(default=True, description="false: plain chat, no retrieval.")
    top_k: int | None = Field(default=None, ge=1, description="Passages given to the model.")
    filters: RagFilters | None = None
    strategy: Literal["hybrid", "lexical", "semantic"] | None = Field(
        default=None, description=f"Retrieval strategy, one of {list(STRATEGIES)}; default: the router's choice."
    )
    rerank: bool | None = Field(default=None, description="Override reranker.enabled for this request.")
    cache: bool = Field(
        default=True, description="false: neither answer from nor store in the response cache (also: `Cache-Control: no-cache`)."
    )


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "ragraph", "max_tokens": 16, "messages": [{"role": "user", "content": "How do I add GPU replicas?"}]},
        {"model": "ragraph", "max_tokens": 8, "stream": True, "rag": {"top_k": 3, "strategy": "lexical"},
         "messages": [{"role": "user", "content": "What does the retriever do?"}]},
    ]})

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    user: str | None = None
    rag: RagOptions = Field(default_factory=RagOptions)

    @model_validator(mode="after")
    def _last_is_user(self) -> ChatRequest:
        if not any(m.role == "user" for m in self.messages):
            raise ValueError("messages must contain at least one message with role 'user'")
        if self.messages[-1].role != "user":
            raise ValueError(f"the last message must have role 'user', got {self.messages[-1].role!r}")
        if not self.messages[-1].text.strip():
            raise ValueError("the last user message is empty")
        return self

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class SearchRequest(_Body):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"query": "index versions", "top_k": 3}]})

    query: str = Field(min_length=1)
    top_k: int | None = Field(default=None, ge=1)
    filters: RagFilters | None = None
    strategy: Literal["hybrid", "lexical", "semantic"] | None = None
    rerank: bool | None = None

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("query is blank")
        return v
