"""router.placement: the router as a deployment of its own (the default) or inside each ingress
replica, without a hop (serve/graph.py decides what is deployed; serve/stages.HandleStages routes in
process). Without Ray: the deployments the graph would make, and the fused route."""

from __future__ import annotations

import asyncio

import pytest

from common.config import ConfigError, load_config
from deployments.router import Message, QueryRouter
from serve.graph import deployed, deployment_options
from serve.stages import HandleStages


def cfg(**env):
    return load_config(environ={f"RAGRAPH__{k}": v for k, v in env.items()})


def test_the_router_is_its_own_deployment_by_default():
    c = cfg()
    assert c.router.placement == "deployment" and deployed(c, "router")
    assert not deployed(cfg(ROUTER__PLACEMENT="ingress"), "router")
    assert deployed(c, "reranker") is c.reranker.enabled


@pytest.mark.parametrize("placement, want", [("deployment", True), ("ingress", False)])
def test_deployment_options_leave_a_fused_router_out(placement, want, monkeypatch):
    import deployments.generator as generator

    monkeypatch.setattr(generator, "generator_options", lambda cfg, name, llm=None: {"name": name})
    c = cfg(ROUTER__PLACEMENT=placement)
    opts = deployment_options(c)
    assert ("router" in opts) is want
    assert {"ingress", "retriever", "generator"} <= set(opts)


def test_a_bad_placement_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"router.placement.*deployment.*ingress"):
        cfg(ROUTER__PLACEMENT="sidecar")


def test_a_fused_router_routes_in_the_ingress_replica():
    c = cfg(ROUTER__PLACEMENT="ingress")
    router = QueryRouter.from_config(c)
    stages = HandleStages(app_name="ragraph", router=router, retriever=None, reranker=None, generator=None,
                          replica="abc123")
    messages = [Message("user", "When is the tasting room open?")]
    reply = asyncio.run(stages.route(messages))
    assert reply.replica == "abc123"
    assert reply.value == router.run(messages=messages)  # the same route the router deployment gives


@pytest.mark.slow
def test_a_graph_with_the_router_in_the_ingress(local_cfg, tmp_path):
    """A real graph (Ray Serve, extractive answers) with ``router.placement: ingress``: no router
    deployment, and the route of a chat comes from the ingress replica that answered it."""
    import time

    import httpx
    import ray
    from ray import serve

    from common.config import AppConfig
    from conftest import indexed_config
    from faults.harness import gcs_replicas, wait_no_orphans
    from serve.launch import deploy

    started = time.time()
    data = indexed_config(local_cfg, tmp_path)
    data["router"]["placement"] = "ingress"
    data["generator"]["answer_mode"] = "extractive"
    data["reranker"]["enabled"] = False
    data["http"]["port"] = 8170
    data["governor"]["db"] = str(tmp_path / "state.sqlite3")
    deploy(AppConfig.model_validate(data), progress=lambda m: print(m, flush=True))
    try:
        assert "router" not in gcs_replicas() and "ingress" in gcs_replicas()
        r = httpx.post("http://127.0.0.1:8170/v1/chat/completions", timeout=60,
                       json={"model": "ragraph", "messages": [{"role": "user", "content": "When is the tasting room open?"}]})
        assert r.status_code == 200, r.text
        meta = r.json()["rag"]["metadata"]
        assert meta["route"]["kind"] and meta["replicas"]["router"] == meta["replicas"]["ingress"], meta
        assert "timings_ms" in meta and "router" in meta["timings_ms"]
    finally:
        serve.shutdown()
        ray.shutdown()
        assert not wait_no_orphans(since=started)
