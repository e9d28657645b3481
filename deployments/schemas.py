"""Structured-output schemas on the generator's side: each distinct ``response_format`` JSON schema
is compiled once, with a time limit, before the engine is given it.

vLLM compiles a request's JSON schema into a grammar with xgrammar inside its engine process, with
no time limit (its thread pool and the CPU are shared by every request). :class:`SchemaGate` first
compiles the schema the same way (xgrammar, the engine's tokenizer, any whitespace) in a worker
process of its own, which it kills when the compile takes longer than
``generator.schema_compile_timeout_s``; such a schema, or one xgrammar cannot compile, is the
client's error (``StageError`` ``invalid``: a 400). The verdict is kept in a bounded LRU keyed by
the sha256 of the schema's canonical JSON (sorted keys, no spaces), so a repeated schema is never
compiled again here, and the engine is handed that canonical text, so xgrammar's own cache in the
engine also sees one key per schema; "did not compile in time" is kept for
:data:`SLOW_VERDICT_TTL_S` only (the machine may have been busy). One compile runs at a time, and a
schema that would wait behind more than :data:`QUEUE_WAITS` of them is told to retry
(``overloaded``: a 503); a schema that passed costs the engine about what it cost here. The ingress bounds the schema's size, nesting and numbers before
any of this (``flow.requests.check_schema_bounds``).

The worker reads compile requests from a pipe: it ends when this process closes its end or dies
(a compile under way finishes first).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
import time
from typing import Any

from deployments.errors import StageError

TIMEOUT_ENV = "RAGRAPH_SCHEMA_COMPILE_TIMEOUT_S"  # set from generator.schema_compile_timeout_s (engine_env)
READY_S = 120.0  # the worker's own start (a Python process importing xgrammar): not the compile's limit


def canonical(schema: dict[str, Any]) -> str:
    """The one JSON text of ``schema``: the key of its verdict and what the engine compiles."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def schema_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(schema).encode()).hexdigest()


def _worker(conn: Any, tokenizer_json: str) -> None:  # pragma: no cover - runs in the worker process
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(tokenizer_json), max_threads=1,
                                   cache_enabled=False)
    conn.send(("ready", None))
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):
            return
        start = time.perf_counter()
        try:
            compiler.compile_json_schema(spec, any_whitespace=True)
            conn.send(("ok", time.perf_counter() - start))
        except Exception as e:  # xgrammar raises RuntimeError (and others) for a schema it cannot compile
            conn.send(("error", _xgrammar_reason(e)))


def _xgrammar_reason(e: BaseException) -> str:
    """xgrammar's message without its log prefix (``[time] file.cc:line: Check failed: ...``)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false: )?", "", text)[:300]


def _default_timeout() -> float:
    from common.config import GeneratorConfig

    return float(os.environ.get(TIMEOUT_ENV) or GeneratorConfig.model_fields["schema_compile_timeout_s"].default)


SLOW_VERDICT_TTL_S = 600  # how long "did not compile in time" is the answer before the schema is tried again
QUEUE_WAITS = 3  # a compile waits for at most this many others (each up to the limit) before a 503


class SchemaGate:
    """Compile-once, time-limited admission of JSON schemas (see the module's docstring)."""

    def __init__(self, tokenizer: Any, *, timeout_s: float | None = None, cache_size: int = 1024) -> None:
        from cachetools import LRUCache, TTLCache

        self.tokenizer = tokenizer
        self.timeout_s = float(timeout_s) if timeout_s is not None else _default_timeout()
        if not self.timeout_s > 0:
            raise ValueError(f"schema compile timeout must be > 0 s, got {self.timeout_s}")
        self.verdicts: LRUCache = LRUCache(maxsize=cache_size)  # sha256 -> None (compiled in time) or why not
        # ... but "too slow" only for SLOW_VERDICT_TTL_S: a schema slow because the machine was busy is tried again
        self.slow: TTLCache = TTLCache(maxsize=cache_size, ttl=SLOW_VERDICT_TTL_S)
        self.compiles = 0  # schemas compiled here (cache misses)
        self.last_compile_s: float | None = None
        self._serial = threading.Lock()  # one compile at a time, across event loops
        self._proc: Any = None
        self._conn: Any = None
        self._tokenizer_json: str | None = None

    async def check(self, schema: dict[str, Any]) -> str:
        """The canonical JSON of ``schema`` for the engine; raises ``StageError`` (invalid) when it
        did not compile within the limit, or cannot be compiled."""
        spec = canonical(schema)
        key = hashlib.sha256(spec.encode()).hexdigest()
        if key not in self.verdicts and key not in self.slow:
            await asyncio.to_thread(self._decide, key, spec)
        reason = self.verdicts.get(key) or self.slow.get(key)
        if reason is not None:
            raise StageError("generator", "invalid", reason)
        return spec

    def _decide(self, key: str, spec: str) -> None:
        # compiles wait for each other at most QUEUE_WAITS compile limits: a flood of new schemas is
        # told to come back (503) instead of holding the replica's threads for ever
        if not self._serial.acquire(timeout=self.timeout_s * QUEUE_WAITS):
            raise StageError("generator", "overloaded", "other response_format schemas are being compiled; "
                             "retry shortly")
        try:
            if key not in self.verdicts and key not in self.slow:  # another request may have compiled it meanwhile
                reason, in_time = self._compile(spec)
                (self.verdicts if in_time else self.slow)[key] = reason
        finally:
            self._serial.release()

    def _compile(self, spec: str) -> tuple[str | None, bool]:
        """(why the schema is refused or None, whether it compiled within the limit)."""
        conn = self._worker()
        self.compiles += 1
        start = time.perf_counter()
        try:
            conn.send(spec)
            if not conn.poll(self.timeout_s):
                self.close()  # the compile is killed with its process; the next schema gets a fresh one
                return (f"the response_format schema did not compile within {self.timeout_s:g} s "
                        "(generator.schema_compile_timeout_s); simplify it (fewer length bounds, patterns, "
                        "properties)"), False
            status, detail = conn.recv()
        except (EOFError, OSError):  # the worker died (killed from outside): no verdict, the next call starts one
            self.close()
            raise StageError("generator", "error", "the schema compiler process ended during a compile") from None
        self.last_compile_s = time.perf_counter() - start
        return (None if status == "ok" else f"the response_format schema cannot be compiled: {detail}"), True

    def _worker(self) -> Any:
        if self._proc is not None and self._proc.is_alive():
            return self._conn
        import multiprocessing

        if self._tokenizer_json is None:
            import xgrammar as xgr

            tok = self.tokenizer
            self._tokenizer_json = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)).serialize_json()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, self._tokenizer_json), daemon=True,
                           name="ragraph-schema-compiler")
        proc.start()
        child.close()
        if not parent.poll(READY_S) or parent.recv()[0] != "ready":
            proc.kill()
            raise StageError("generator", "error", "the schema compiler process did not start")
        self._proc, self._conn = proc, parent
        return parent

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def close(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.kill()
            proc.join(5)
