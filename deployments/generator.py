"""The generator stage: vLLM behind ``ray.serve.llm``, and the one seam the ingress generates through.

* :class:`Generator` (protocol): ``generate(GenRequest)`` yields :class:`GenDelta` (text, finish
  reason, usage): structured deltas, never SSE text. Two implementations:
  :class:`EngineGenerator` (vLLM's ``AsyncLLM`` in this process: the in-process app, and inside the
  Serve replica) and :class:`ServeGenerator` (a Serve handle to that replica).
* :func:`build_generator`: ``LLMConfig`` (:func:`llm_config`) -> ``LLMServer`` deployment (what
  ``build_llm_deployment`` binds, computed without starting Ray). The engine is
  ``ray.serve.llm``'s ``LLMServer`` (vLLM's ``AsyncLLM``, continuous batching, token streaming);
  we do not wrap vLLM by hand. Its replica (``deployments.llm_adapter.DeltaLLMServer``) adds one
  method, ``deltas``, that runs :class:`EngineGenerator` on the engine ``LLMServer`` started.

Cold start on CPU (docs/operations.md): eager mode (no torch.compile warm-up), and the local
model is already on disk, so the per-node "download" task that ``ray.serve.llm`` runs by default
is skipped (``llm_adapter.LocalModelCallback``, 13 s). The engine's worker stays a separate process: both
``ray.serve.llm`` and vLLM's CPU platform force the multiprocess executor (OpenMP thread binding).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from deployments.engine import EngineGenerator, GenDelta, GenRequest  # noqa: F401  (the seam's types)
from deployments.errors import from_exception


class Generator(Protocol):
    def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]:
        """Deltas until one carries ``finish_reason``; raises :class:`StageError` on failure
        (``invalid``: the engine refused the request's values; ``overloaded``: its queue is full)."""
        ...


class ServeGenerator:
    """:class:`Generator` over a Serve handle to the generator deployment (``DeltaLLMServer.deltas``)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def generate(self, request: GenRequest) -> AsyncIterator[GenDelta]:
        stream = None
        try:  # .remote() itself may refuse (a full queue, no replica): inside the try
            stream = self.handle.options(stream=True).deltas.remote(request)
            async for batch in stream:
                for d in batch:
                    yield d
        except Exception as e:
            raise from_exception("generator", e) from None
        finally:
            cancel = getattr(stream, "cancel", None) if stream is not None else None
            if cancel is not None:
                cancel()


# ---------------------------------------------------------------------------------------------
# the engine deployment (ray.serve.llm)


def llm_config(cfg) -> Any:
    """The ``ray.serve.llm.LLMConfig`` for the configured generator."""
    from ray.serve.llm import LLMConfig

    from deployments.llm_adapter import LocalModelCallback

    g, d = cfg.generator, cfg.generator.deployment
    location = cfg.models.location("generator")
    engine = g.engine_kwargs(location)
    engine.pop("model")
    kw: dict[str, Any] = {}
    if g.device == "cpu":
        # One bundle holds the replica and its engine: the replica actor itself asks for 0 CPUs, so
        # the whole generator takes `deployment.num_cpus` (ray.serve.llm's default adds 1 for the actor).
        kw["placement_group_config"] = {"bundles": [{"CPU": d.num_cpus, **d.resources}], "strategy": "PACK"}
        actor: dict[str, Any] = {"num_cpus": 0}
    else:
        # The engine's bundles (one GPU per tensor-parallel worker) come from ray.serve.llm; the
        # replica's own CPUs and custom resources are merged into the first bundle.
        actor = {"num_cpus": d.num_cpus, **({"resources": dict(d.resources)} if d.resources else {})}
        if d.accelerator_type:
            kw["accelerator_type"] = d.accelerator_type
    from common.config import LOGGING

    opts = d.serve_options()
    opts["ray_actor_options"] = actor
    opts["logging_config"] = LOGGING
    return LLMConfig(
        model_loading_config={"model_id": g.served_model_name, "model_source": location},
        engine_kwargs=engine,
        deployment_config=opts,
        runtime_env={"env_vars": {
            **g.engine_env(),
            "HF_HUB_OFFLINE": "1" if cfg.models.generator.source != "hub" else "0",
            # vLLM's own logging setup replaces Serve's handlers: the replica's JSON log (with the
            # request id on every line) would stop after start-up.
            "VLLM_CONFIGURE_LOGGING": "0",
        }},
        callback_config={"callback_class": LocalModelCallback},
        **kw,
    )


def generator_options(cfg, *, name: str = "generator", llm: Any = None) -> dict[str, Any]:
    """The generator's Serve options as ``ray.serve.llm`` computes them (``LLMServer``'s placement
    bundles from the engine config, the builder's defaults applied), without a running Ray."""
    from deployments.llm_adapter import deployment_options

    opts = deployment_options(llm or llm_config(cfg))
    opts["name"] = name
    return opts


def build_generator(llm: Any, options: dict[str, Any]) -> Any:
    """The bound generator deployment: ``ray.serve.llm``'s ``LLMServer`` (with ``deltas``) for
    ``llm`` (from :func:`llm_config`) with ``options`` (from :func:`generator_options` for the same
    ``llm``), as ``build_llm_deployment`` binds it, but without starting Ray."""
    from ray import serve

    from deployments.llm_adapter import server_class

    return serve.deployment(server_class(), **options).bind(llm_config=llm)
