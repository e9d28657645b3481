"""Everything ragraph takes from ``ray.serve.llm``'s internals, in one version-checked place.

``ray.serve.llm`` exposes ``LLMConfig`` and builders that start Ray; ragraph also needs, without
starting Ray, the Serve options its ``LLMServer`` computes (placement bundles, builder defaults),
a callback that skips the per-node model "download" of a local folder, and an ``LLMServer`` whose
replica hands the ingress structured token deltas instead of OpenAI SSE text and guards its engine's
processes (they die with the replica). Those live under
``ray.llm._internal``, which may change between Ray releases: :data:`TESTED_RAY` names the version
this module was written against, and :func:`check_ray_version` refuses any other at graph build
(``RAGRAPH_ALLOW_UNTESTED_RAY=1`` overrides, for trying a new Ray).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
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
    """``LLMServer``'s Serve options for ``llm`` with the builder's defaults, computed without a
    running Ray: ``LLMServer`` merges the driver's runtime env into the replica's, and asking for it
    would start Ray, so outside a Ray driver it is taken as empty (what a fresh cluster's driver has)."""
    from unittest import mock

    import ray
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.server.builder import DEFAULT_DEPLOYMENT_OPTIONS
    from ray.runtime_env import RuntimeEnv

    check_ray_version()
    no_driver = SimpleNamespace(runtime_env=RuntimeEnv())
    offline = (
        contextlib.nullcontext() if ray.is_initialized()
        else mock.patch.object(ray, "get_runtime_context", lambda: no_driver)
    )
    with offline:
        opts = DeltaLLMServer.get_deployment_options(llm)
    return maybe_apply_llm_deployment_config_defaults(DEFAULT_DEPLOYMENT_OPTIONS, opts)
