"""The HTTP API's response models: what every JSON route answers (each route's ``response_model``),
and OpenAI's error body.

Each model names the fields clients read and allows more (``extra="allow"``), and routes answer
only the fields the endpoint set (``response_model_exclude_unset``): a model documents and checks a
response, it never drops or adds a field. Rows read from the service's state (usage, jobs, index
versions, documents, feedback) are passed on as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


Row = dict[str, Any]
Number = int | float  # a number as the endpoint wrote it (an int stays an int)


# ---------------------------------------------------------------------------------------------
# errors


class ErrorDetail(Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Open):
    """OpenAI's error body; the status, ``Retry-After`` and ``WWW-Authenticate`` say the rest."""

    error: ErrorDetail


# ---------------------------------------------------------------------------------------------
# chat and search


class RagMetadata(Open):
    """``rag.metadata`` of an answer, ``metadata`` of a search: what the request's trace shows."""

    request_id: str
    model: str
    index_version: str | None = None
    cached: bool = False
    status: Literal["ok", "degraded", "sources_only"]
    degraded: list[str] = Field(default_factory=list, description="Stages the request went without.")
    degraded_reasons: dict[str, str] = Field(default_factory=dict)
    timings_ms: dict[str, Number] = Field(default_factory=dict)
    replicas: dict[str, str] = Field(default_factory=dict)
    retries: dict[str, int] = Field(default_factory=dict)
    route: dict[str, Any] | None = Field(default=None, description="The router's decision (kind, query, strategy, "
                                         "domains, reasons).")
    rag: bool | None = None
    context_tokens: int | None = None
    dropped_turns: int | None = None
    tokens: dict[str, int] | None = None
    citations: Literal["model", "attributed", "extracted", "listed", "none"] | None = None
    answer: dict[str, Any] | None = Field(default=None, description="mode (generate, extractive, abstain, "
                                          "sources_only), loop_stopped, note.")
    cached_request_id: str | None = None


class RagSource(Open):
    index: int
    document_id: str
    chunk_id: str
    title: str
    heading_path: str
    excerpt: str
    relevance_score: Number | None = None
    source: str
    domain: str
    cited: bool


class Rag(Open):
    """The ``rag`` extension of a chat completion: the sources given to the model and the metadata."""

    sources: list[RagSource]
    metadata: RagMetadata


class AssistantMessage(Open):
    role: Literal["assistant"]
    content: str


class Choice(Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class TokenUsage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(Open):
    """OpenAI's ``chat.completion``, with ``rag``. With ``stream: true`` the answer comes as
    ``text/event-stream`` instead: ``chat.completion.chunk`` objects, the last one with ``rag``,
    then ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: TokenUsage
    rag: Rag


class SearchResult(Open):
    rank: int
    chunk_id: str
    document_id: str
    title: str
    heading_path: str
    source: str
    domain: str
    excerpt: str
    text: str
    relevance_score: Number | None = None
    scores: dict[str, Number] = Field(default_factory=dict, description="Each retriever's own score.")


class SearchResponse(Open):
    object: Literal["search.results"]
    query: str
    results: list[SearchResult]
    metadata: RagMetadata


# ---------------------------------------------------------------------------------------------
# models, usage, the cache, health


class ModelCard(Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None


class ModelList(Open):
    object: Literal["list"]
    data: list[ModelCard]


class UsageReport(Open):
    """One key's usage today and this month, its limits and its budget."""

    object: Literal["usage"]
    key_id: str
    day: Row
    month: Row
    currency: str
    limits: Row
    budget: Row


class UsageList(Open):
    """Every key's usage (``all=true``, admin)."""

    object: Literal["list"]
    currency: str
    data: list[Row]


class CacheStats(Open):
    enabled: bool
    storage: str | None = None
    entries: int | None = None
    max_entries: int | None = None
    ttl_s: Number | None = None
    hits: int | None = None
    misses: int | None = None
    hit_rate: Number | None = None
    stores: int | None = None
    clears: int | None = None


class CacheCleared(Open):
    object: Literal["cache.cleared"]
    removed: int


class Health(Open):
    status: Literal["ok"]


class Readiness(Open):
    """200 when every check is ok, else 503 with ``Retry-After``; details only for an admin."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str]


# ---------------------------------------------------------------------------------------------
# documents, jobs and the index


class JobAccepted(Open):
    job_id: str
    object: Literal["ingest.job"]
    status: str
    url: str


class Job(Open):
    id: str
    object: Literal["ingest.job"]
    kind: str
    status: str


class JobList(Open):
    object: Literal["list"]
    data: list[Job]
    has_more: bool


class DocumentList(Open):
    object: Literal["list"]
    version: str | None = None
    total: int
    data: list[Row]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class IndexVersions(Open):
    object: Literal["index"]
    live: str | None = None
    versions: list[Row]
    keep_versions: int
    embedder: Row
    documents: int
    chunks: int


class IndexRollback(Open):
    object: Literal["index.rollback"]
    previous: str | None = None
    live: str | None = None
    changed: bool


# ---------------------------------------------------------------------------------------------
# conversations and feedback


class Conversation(Open):
    id: str
    object: Literal["conversation"]
    title: str
    created: Number
    updated: Number
    turns: int | list[Row] = Field(description="In a list: how many; one conversation: its turns, oldest first.")


class ConversationList(Open):
    object: Literal["list"]
    data: list[Conversation]


class ConversationDeleted(Open):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class Feedback(Open):
    object: Literal["feedback"]
    request_id: str
    score: int
    comment: str | None = None
    conversation_id: str | None = None
    updated: Number


class FeedbackList(Open):
    object: Literal["list"]
    data: list[Row]
    has_more: bool
