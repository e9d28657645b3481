"""The flow's requests: a chat (:class:`ChatRequest`, OpenAI's chat completion request) and a
search (:class:`SearchRequest`), as pydantic models that refuse what cannot be served, and
:func:`check_limits`, the configured size limits (``http.limits``).

A chat accepts what OpenAI's ``/v1/chat/completions`` accepts (the parameters the
``openai`` client and LangChain send), vLLM's sampling extensions (``top_k``, ``min_p``,
``repetition_penalty``, ``ignore_eos``, ...: what ``vllm bench serve`` sends), and one extension
body field, ``rag``. What the engine honours is passed on; what changes nothing here (``store``,
``metadata``, ``service_tier``, ``reasoning_effort``, ``parallel_tool_calls``, ``tools`` that the
model may leave uncalled) is accepted and ignored; what would change the answer and cannot be
honoured (a tool call the client requires) is refused, naming the field. Unknown parameters are
refused, naming them, as OpenAI does. Every number is bounded to what
the engine accepts, so that no value reaches vLLM only to be refused there. A ``response_format``
JSON schema is bounded in size, nesting, numbers, length bounds and patterns
(:func:`check_schema_bounds`) before the generator compiles it (``deployments/schemas.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.retriever import STRATEGIES
from flow.errors import FlowError


class StrictModel(BaseModel):
    """A request body: an unknown field is refused."""

    model_config = ConfigDict(extra="forbid")


# What the engine accepts (vLLM's own OpenAI server bounds seeds to a signed 64-bit integer).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs
MAX_LOGIT_BIAS = 300
TOKEN_ID_MAX = 2**31 - 1
# A response_format JSON schema is compiled into a grammar by xgrammar (in the generator, once per distinct
# schema, with a time limit: deployments/schemas.py); these bounds keep that compile small before it is tried.
MAX_SCHEMA_CHARS = 8_000  # the schema as JSON
MAX_SCHEMA_DEPTH = 32  # objects and arrays nested in the schema's JSON
MAX_SCHEMA_VALUES = 1_000  # JSON values in it (subschemas, property names' schemas, enum members, ...)
MAX_SCHEMA_NUMBER = 10**15  # |minimum|, |maximum|, ... (xgrammar refuses integers beyond 64 bits)
MAX_SCHEMA_COUNT = 4_096  # minItems/maxItems/minProperties/maxProperties, and minLength/maxLength
# Each string with a length bound costs xgrammar 1-4 s to compile on 2 busy CPU cores (no bound: 10 ms).
MAX_SCHEMA_LENGTH_BOUNDS = 4
MAX_SCHEMA_PATTERNS = 8  # `pattern` and `patternProperties` regexes
MAX_PATTERN_CHARS = 256
MAX_PATTERN_REPEAT = 64  # n and m of a {n,m} in a pattern


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer", "tool"] = Field(
        description="'system' (or 'developer'), 'user', 'assistant', or 'tool' (a tool's result, given to the model "
        "as context)."
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None,
        description="Text, or a list of {'type': 'text', 'text': ...} parts. May be null on an assistant message "
        "that made tool calls.",
    )
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(default=None, description="An assistant's earlier tool calls.")
    tool_call_id: str | None = Field(default=None, description="On a 'tool' message: the call it answers.")
    refusal: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v: str | list[dict[str, Any]] | None) -> str:
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        texts = []
        for i, part in enumerate(v):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} has type {part.get('type')!r}; only 'text' parts are supported")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_where_needed(self) -> ChatMessage:
        if self.role in ("user", "system", "developer") and "content" not in self.model_fields_set:
            raise ValueError(f"a {self.role!r} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs tool_call_id")
        return self

    @property
    def text(self) -> str:
        assert isinstance(self.content, str)
        return self.content


class RagFilters(StrictModel):
    domains: list[str] | None = Field(default=None, description="Only passages from these domains.")
    updated_after: str | None = Field(default=None, description="ISO 8601 date; inclusive.")
    updated_before: str | None = Field(default=None, description="ISO 8601 date; inclusive.")


class RagOptions(StrictModel):
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
    conversation_id: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="Append this question and its answer as a turn of that conversation (POST /v1/conversations "
        "makes one; 404 when the caller has none with this id). The messages sent are still the whole context.",
    )


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension; accepted, usage comes once at the end


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="'text' (default), 'json_object' (the answer is one JSON object) or 'json_schema' (it matches "
        "`json_schema.schema`); the engine's structured decoding enforces it."
    )
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if self.type == "json_schema":
            if not self.json_schema or not isinstance(self.json_schema.get("schema"), dict):
                raise ValueError("response_format type 'json_schema' needs json_schema.schema (a JSON Schema object)")
            size = len(json.dumps(self.json_schema["schema"]))
            if size > MAX_SCHEMA_CHARS:
                raise ValueError(f"response_format.json_schema.schema is {size} characters as JSON; the limit is "
                                 f"{MAX_SCHEMA_CHARS}")
            check_schema_bounds(self.json_schema["schema"])
        return self

    @property
    def schema(self) -> dict[str, Any] | None:
        return self.json_schema["schema"] if self.type == "json_schema" and self.json_schema else None


_SUBSCHEMA = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_NUMBERS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
_COUNTS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains", "minLength",
           "maxLength")
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def check_schema_bounds(schema: dict[str, Any]) -> None:
    """Raise ValueError naming the first bound ``schema`` exceeds: nesting, size in values, its
    numbers, string length bounds and patterns (the constants above)."""
    where = "response_format.json_schema.schema"
    values, stack = 0, [(schema, 1)]
    while stack:  # the JSON as a whole: depth and size
        node, depth = stack.pop()
        values += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"{where} nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep; the limit is "
                             f"{MAX_SCHEMA_DEPTH}")
        if values > MAX_SCHEMA_VALUES:
            raise ValueError(f"{where} holds more than {MAX_SCHEMA_VALUES} JSON values; the limit is {MAX_SCHEMA_VALUES}")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    length_bounds, patterns, todo = 0, 0, [schema]
    while todo:  # the schemas in it (never enum, const or default values, nor property names): their keywords
        sub = todo.pop()
        if not isinstance(sub, dict):
            continue
        for key in _NUMBERS:
            v = sub.get(key)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v != v
                                  or abs(v) > MAX_SCHEMA_NUMBER):
                raise ValueError(f"{where}: {key}={v!r}; it must be a number of at most {MAX_SCHEMA_NUMBER:.0e} "
                                 "in magnitude")
        for key in _COUNTS:
            v = sub.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_SCHEMA_COUNT):
                raise ValueError(f"{where}: {key}={v!r}; it must be an integer from 0 to {MAX_SCHEMA_COUNT}")
        if "minLength" in sub or "maxLength" in sub:
            length_bounds += 1
            if length_bounds > MAX_SCHEMA_LENGTH_BOUNDS:
                raise ValueError(f"{where} bounds the length of more than {MAX_SCHEMA_LENGTH_BOUNDS} strings "
                                 f"(minLength/maxLength); the limit is {MAX_SCHEMA_LENGTH_BOUNDS}")
        regexes = [sub["pattern"]] if "pattern" in sub else []
        if isinstance(sub.get("patternProperties"), dict):
            regexes += list(sub["patternProperties"])
        for rx in regexes:
            patterns += 1
            if patterns > MAX_SCHEMA_PATTERNS:
                raise ValueError(f"{where} has more than {MAX_SCHEMA_PATTERNS} patterns; the limit is "
                                 f"{MAX_SCHEMA_PATTERNS}")
            if not isinstance(rx, str) or len(rx) > MAX_PATTERN_CHARS:
                raise ValueError(f"{where}: a pattern must be a string of at most {MAX_PATTERN_CHARS} characters")
            for m in _REPEAT.finditer(rx):
                n = max(int(x) for x in m.groups() if x)
                if n > MAX_PATTERN_REPEAT:
                    raise ValueError(f"{where}: the pattern repeat {m.group(0)} exceeds {MAX_PATTERN_REPEAT}; the "
                                     f"limit is {MAX_PATTERN_REPEAT}")
        todo.extend(sub.get(k) for k in _SUBSCHEMA)
        for k in _SUBSCHEMA_LISTS:
            if isinstance(sub.get(k), list):
                todo.extend(sub[k])
        for k in _SUBSCHEMA_MAPS:
            if isinstance(sub.get(k), dict):
                todo.extend(sub[k].values())


class ChatRequest(StrictModel):
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
    stop: str | list[str] | None = Field(
        default=None, description=f"Up to {MAX_STOP} sequences of at most {MAX_STOP_CHARS} characters."
    )
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = Field(default=None, description="Return each answer token's log probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) -> bias in [-100, 100] added to its logit."
    )
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=256)
    # accepted, and change nothing here
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Accepted; this service never calls a tool (tool_choice 'required' or a named "
        "function is refused)."
    )
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    service_tier: str | None = Field(default=None, max_length=32)
    reasoning_effort: str | None = Field(default=None, max_length=32)
    # vLLM's sampling extensions, as vLLM's own OpenAI server takes them
    top_k: int | None = Field(default=None, ge=-1, le=1_000_000, description="-1 or 0: off.")
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    rag: RagOptions = Field(default_factory=RagOptions)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}")
        for i, s in enumerate(stops):
            if not s:
                raise ValueError(f"stop sequence {i} is empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop sequence {i} has {len(s)} characters; the limit is {MAX_STOP_CHARS}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(v)}")
        for token, bias in v.items():
            if not token.isdigit() or int(token) > TOKEN_ID_MAX:
                raise ValueError(f"logit_bias keys are token ids (non-negative integers as strings), got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{token!r}] must be in [-100, 100], got {bias}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        for t in v or []:
            if not 0 <= t <= TOKEN_ID_MAX:
                raise ValueError(f"stop_token_ids holds {t}, not a token id")
        return v

    @model_validator(mode="after")
    def _honourable(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if isinstance(choice, dict) or choice == "required":
            raise ValueError("tool_choice: this service answers in text and never calls a tool; send tool_choice "
                             "'none' or 'auto', or leave it out")
        if choice not in (None, "none", "auto"):
            raise ValueError(f"tool_choice must be 'none', 'auto' or 'required', got {choice!r}")
        return self

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
    def json_mode(self) -> bool:
        """The answer must be JSON (``response_format``): no citation markers are added to it."""
        return self.response_format is not None and self.response_format.type != "text"

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class SearchRequest(StrictModel):
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


def check_limits(req: ChatRequest | SearchRequest, limits: Any) -> None:
    """The configured size limits (``http.limits``): ``invalid`` (``limit_exceeded``), naming the
    field and the limit."""

    def refuse(param: str, what: str, limit: int, got: int, key: str) -> None:
        raise FlowError("invalid", f"{param}: {what} at most {limit} (http.limits.{key}), got {got}",
                        param=param, code="limit_exceeded")

    if isinstance(req, SearchRequest):
        if len(req.query) > limits.max_query_chars:
            refuse("query", "characters:", limits.max_query_chars, len(req.query), "max_query_chars")
        return
    if len(req.messages) > limits.max_messages:
        refuse("messages", "messages:", limits.max_messages, len(req.messages), "max_messages")
    for i, m in enumerate(req.messages):
        if len(m.text) > limits.max_message_chars:
            refuse(f"messages[{i}].content", "characters:", limits.max_message_chars, len(m.text), "max_message_chars")
