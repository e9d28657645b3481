"""The graph builder: one config -> one Serve application.

    ingress (FastAPI) -> router -> retriever -> reranker (optional) -> generator (ray.serve.llm)
       \-> governor (API keys, rate limits, quotas, response cache; one replica)

Every stage's Serve options (autoscaling, admission limits, resources) come from its
``deployment`` section in the config (``DeploymentOptions.serve_options``).
"""

from __future__ import annotations

from typing import Any

APP_NAME = "ragraph"
LOGGING = {"encoding": "JSON", "log_level": "INFO"}


def build_app(cfg, *, app_name: str = APP_NAME):
    """The bound Serve application for ``cfg`` (an :class:`serve.config.AppConfig`)."""
    from ray import serve

    from deployments.generator import build_generator
    from deployments.governor import GovernorDeployment
    from deployments.reranker import RerankerDeployment
    from deployments.retriever import RetrieverDeployment
    from deployments.router import RouterDeployment
    from serve.app import RagIngress

    def stage(cls, name: str, section) -> Any:
        return serve.deployment(cls, name=name, logging_config=LOGGING, **section.deployment.serve_options()).bind(cfg)

    router = stage(RouterDeployment, "router", cfg.router)
    retriever = stage(RetrieverDeployment, "retriever", cfg.retriever)
    reranker = stage(RerankerDeployment, "reranker", cfg.reranker) if cfg.reranker.enabled else None
    generator = build_generator(cfg, name="generator")
    governor = stage(GovernorDeployment, "governor", cfg.governor)
    ingress = serve.deployment(RagIngress, name="ingress", logging_config=LOGGING, **cfg.http.deployment.serve_options())
    return ingress.bind(cfg, router, retriever, reranker, generator, governor, app_name)


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve run`` / ``serve deploy`` configs: ``args`` is ``{"config": PATH}`` or
    the whole config tree (what ``ragraph serve --export`` writes)."""
    from serve.config import AppConfig, load_config

    if set(args) <= {"config"}:
        return build_app(load_config(args.get("config")))
    return build_app(AppConfig.model_validate(args))
