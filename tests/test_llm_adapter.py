"""The generator deployment's Serve options are ``ray.serve.llm``'s ``LLMServer``'s own, computed
without starting Ray (deployments/llm_adapter.py): the same options ``LLMServer`` computes, with the
driver's runtime env merged in only where a driver is connected."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import load_config
from deployments.generator import llm_config
from deployments.llm_adapter import DeltaLLMServer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("config", ["local.yaml", "gpu.yaml"])
def test_the_options_are_llm_servers_own_without_a_driver(config, monkeypatch):
    import ray
    from ray.runtime_env import RuntimeEnv
    from ray.serve.llm import LLMServer

    llm = llm_config(load_config(CONFIGS / config, environ={}))
    ours = DeltaLLMServer.get_deployment_options(llm)
    assert not ray.is_initialized()  # computing them started no Ray
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env=RuntimeEnv()))
    assert ours == LLMServer.get_deployment_options(llm)


def test_a_connected_drivers_runtime_env_is_merged_as_llm_server_merges_it(monkeypatch):
    import ray
    from ray.runtime_env import RuntimeEnv
    from ray.serve.llm import LLMServer

    llm = llm_config(load_config(CONFIGS / "gpu.yaml", environ={}))
    driver = {"env_vars": {"DRIVER_ONLY": "1"}, "excludes": ["*.log"]}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(runtime_env=RuntimeEnv(**driver)))
    ours = DeltaLLMServer.get_deployment_options(llm)
    assert ours == LLMServer.get_deployment_options(llm)
    assert ours["ray_actor_options"]["runtime_env"]["excludes"] == ["*.log"]  # the driver's, merged in
