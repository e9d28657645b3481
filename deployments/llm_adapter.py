"""Everything ragraph takes from ``ray.serve.llm``'s internals, in one version-checked place.

``ray.serve.llm`` exposes ``LLMConfig`` and builders that start Ray; ragraph also needs, without
starting Ray, the Serve options its ``LLMServer`` computes (placement bundles, builder defaults:
:meth:`DeltaLLMServer.get_deployment_options` computes them as ``LLMServer`` does, taking the
driver's runtime env only where a driver is connected),
a callback that skips the per-node model "download" of a local folder, and an ``LLMServer`` whose
replica hands the ingress structured token deltas instead of OpenAI SSE text and guards its engine's
processes (they die with the replica). Those live under
``ray.llm._internal``, which may change between Ray releases: :data:`TESTED_RAY` names the version
this module was written against, and :func:`check_ray_version` refuses any other at graph build
(``RAGRAPH_ALLOW_UNTESTED_RAY=1`` overrides, for trying a new Ray).
"""

from __future__ import annotations

import copy
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

TESTED_RAY = "2.60.0"

try:  # the callback base comes with ray[serve]; the module still imports without Ray
    from ray.llm._internal.common.callbacks.base import CallbackBase as _CallbackBase
    from ray.serve.llm import LLMServer as _LLMServer
except ImportError:  # pragma: no cover
    _CallbackBase = object  # type: ignore[assignment,misc]
    _LLMServer = object  # type: ignore[assignment,misc]


def check_ray_version() -> None:
    import ray

    if ray.__version__ != TESTED_RAY and os.environ.get("RAGRAPH_ALLOW_UNTESTED_RAY") != "1":
        raise RuntimeError(
            f"deployments/llm_adapter.py uses ray.serve.llm internals as of Ray {TESTED_RAY}, but Ray "
            f"{ray.__version__} is installed; pin ray=={TESTED_RAY} (pyproject.toml) or re-check this module "
            "and set RAGRAPH_ALLOW_UNTESTED_RAY=1"
        )


class LocalModelCallback(_CallbackBase):  # type: ignore[misc,valid-type]
    """Skips ``ray.serve.llm``'s per-node model download when the model is a local folder that
    `ragraph models` has provisioned: the download task only re-imports vLLM in a fresh worker (13 s
    of every cold start on CPU) to find files that are already there."""

    async def on_before_node_init(self) -> None:
        source = self.llm_config.model_loading_config.model_source
        if isinstance(source, str) and Path(source).is_dir():
            self.ctx.run_init_node = False


class DeltaLLMServer(_LLMServer):  # type: ignore[misc,valid-type]
    """``ray.serve.llm``'s ``LLMServer`` (engine start, health checks, placement) plus
    :meth:`deltas`: the engine's output as :class:`deployments.generator.GenDelta` lists, straight
    from vLLM's ``AsyncLLM``, with no OpenAI text between the engine and the ingress. Before the
    engine starts, the replica starts its engine guard (:mod:`deployments.engine_guard`): the
    engine's processes die with the replica however it dies, its Ray included; a health check
    restarts a guard that is gone."""

    @classmethod
    def get_deployment_options(cls, llm_config: Any) -> dict[str, Any]:
        """``LLMServer``'s Serve options for ``llm_config`` (the engine's placement bundles, with the
        replica's own resources merged into the first; the replica's runtime env), computed as
        ``LLMServer.get_deployment_options`` of :data:`TESTED_RAY` computes them, except that the
        driver's runtime env, which ``LLMServer`` merges into the replica's, is asked of Ray only
        where a driver is connected: asking starts Ray. Without one it is taken as empty (what a
        fresh cluster's driver has)."""
        import ray
        from ray.llm._internal.serve.constants import ENABLE_WORKER_PROCESS_SETUP_HOOK
        from ray.llm._internal.serve.core.server.llm_server import _merge_replica_actor_and_child_actor_bundles

        engine = llm_config.get_engine_config()
        options = copy.deepcopy(llm_config.deployment_config)
        if "placement_group_bundles" in options or "placement_group_strategy" in options:
            raise ValueError("placement_group_bundles and placement_group_strategy must not be specified in "
                             "deployment_config; set the LLMConfig's placement_group_config instead")
        actor = options.get("ray_actor_options", {})
        if not engine.accelerator.requires_deferred_placement_group:
            replica = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
            if "memory" in actor:
                replica["memory"] = actor["memory"]
            options["placement_group_bundles"] = _merge_replica_actor_and_child_actor_bundles(
                engine.placement_bundles, replica)
            options["placement_group_strategy"] = engine.placement_strategy
        driver = dict(ray.get_runtime_context().runtime_env) if ray.is_initialized() else {}
        if ENABLE_WORKER_PROCESS_SETUP_HOOK:
            driver["worker_process_setup_hook"] = "ray.llm._internal.serve._worker_process_setup_hook"
        actor["runtime_env"] = {**driver, **actor.get("runtime_env", {}), **(llm_config.runtime_env or {})}
        options["ray_actor_options"] = actor
        return options

    async def start(self):
        from deployments.engine_guard import ensure_guard

        ensure_guard()
        await super().start()

    async def check_health(self) -> None:
        from deployments.engine_guard import ensure_guard

        ensure_guard()
        await super().check_health()

    async def deltas(self, request: Any) -> AsyncIterator[list[Any]]:
        from deployments.engine import EngineGenerator

        if self.engine is None or getattr(self.engine, "_engine_client", None) is None:
            from deployments.errors import StageError

            raise StageError("generator", "unavailable", "the engine is not started")
        gen = getattr(self, "_rag_generator", None)
        if gen is None:
            gen = self._rag_generator = EngineGenerator(self.engine._engine_client)
        interval_ms = self._get_batch_interval_ms()  # LLMConfig.experimental_configs["stream_batching_interval_ms"]
        async for batch in gen.batches(request, interval_s=(interval_ms or 0) / 1000):
            yield batch


def server_class() -> type:
    return DeltaLLMServer


def deployment_options(llm: Any) -> dict[str, Any]:
    """The generator deployment's Serve options for ``llm``: :meth:`DeltaLLMServer.get_deployment_options`
    with the builder's defaults applied, computed without a running Ray."""
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.server.builder import DEFAULT_DEPLOYMENT_OPTIONS

    check_ray_version()
    return maybe_apply_llm_deployment_config_defaults(DEFAULT_DEPLOYMENT_OPTIONS,
                                                      DeltaLLMServer.get_deployment_options(llm))
