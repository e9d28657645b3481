"""The request flow, below the HTTP layer: domain requests in (:mod:`flow.requests`), domain
errors out (:mod:`flow.errors`), no FastAPI or Starlette.

Today it holds the pipeline (:mod:`flow.pipeline`, a facade over the units): search
(:mod:`flow.search`), chat preparation (:mod:`flow.chat`: route, retrieve, rerank, prompt, cache
lookup), the answer stream (:mod:`flow.stream`) and token accounting (:mod:`flow.accounting`); the
stage and state calls they make (:mod:`flow.calls`: timeouts, retries, the state threads) and the
generator's circuit breaker (:mod:`flow.breaker`); the prompt builder and citations
(:mod:`flow.prompt`), extractive answers and the loop guard (:mod:`flow.extractive`); the trace and
the typed events (:mod:`flow.events`) with their OpenAI shapes (:mod:`flow.openai`); and the
service's metrics (:mod:`flow.metrics`).
"""
