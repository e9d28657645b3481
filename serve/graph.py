"""The graph builder: one config -> one Serve application.

    ingress (FastAPI) -> router -> retriever -> reranker (optional) -> generator (ray.serve.llm)

No deployment holds the service's state: every ingress replica reads and writes the shared state
database (``state``: keys, usage, conversations, jobs) and the shared counters and cache (Redis),
so any replica can answer any request.

Every stage's Serve options (autoscaling, admission limits, resources) come from its
``deployment`` section in the config (``DeploymentOptions.serve_options``).

Also the exposure check every way of serving passes through (:func:`check_exposure`: the graph
builder, the ``serve deploy`` app builder, the in-process app of ``serve.local``, the KubeRay
manifest): auth off on a non-loopback bind is refused unless ``http.insecure_auth_off`` is set.
"""

from __future__ import annotations

from typing import Any

from common.config import LOGGING

APP_NAME = "ragraph"


STAGES = ("ingress", "router", "retriever", "reranker", "generator")


class ExposureError(ValueError):
    """The config would serve every endpoint without keys to the network."""


def exposure_problem(cfg) -> str | None:
    """Why ``cfg`` must not be served as it is (None: nothing to refuse): auth off
    (``governor.auth.enabled: false``) on an ``http.host`` beyond loopback, without the explicit
    opt-in ``http.insecure_auth_off``."""
    from common.networks import LOCAL_HOSTS, is_loopback

    host = cfg.http.host
    if cfg.governor.auth.enabled or cfg.http.insecure_auth_off or host in LOCAL_HOSTS or is_loopback(host):
        return None
    return (f"refusing to listen on {host or 'every address'} with auth off (governor.auth.enabled: false): anyone "
            "who can reach the port could use the service. Turn auth on and create a key (`ragraph keys create "
            "NAME`), or serve without keys on purpose: `ragraph serve --insecure`, or http.insecure_auth_off: true "
            "in the config (e.g. RAGRAPH__HTTP__INSECURE_AUTH_OFF=true)")


def check_exposure(cfg) -> None:
    """Raise :class:`ExposureError` when :func:`exposure_problem` finds one."""
    problem = exposure_problem(cfg)
    if problem:
        raise ExposureError(problem)


def deployed(cfg, stage: str) -> bool:
    """Whether ``stage`` runs as a deployment of its own: the reranker only when enabled, the
    router unless ``router.placement`` puts it inside the ingress replicas."""
    if stage == "reranker":
        return cfg.reranker.enabled
    if stage == "router":
        return cfg.router.placement == "deployment"
    return True


def deployment_options(cfg, *, llm: Any = None) -> dict[str, dict[str, Any]]:
    """Each deployment's Serve options (autoscaling, admission limits, resources, placement), by
    deployment name, computed without starting Ray: what :func:`build_app` deploys. A stage that
    runs inside another's replicas is left out (:func:`deployed`: the reranker when
    ``reranker.enabled`` is false, the router with ``router.placement: ingress``). ``llm``: the
    generator's ``LLMConfig`` when the caller already made it."""
    from deployments.generator import generator_options

    sections = {"ingress": cfg.http, "router": cfg.router, "retriever": cfg.retriever, "reranker": cfg.reranker}
    out: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        if name == "generator":
            out[name] = generator_options(cfg, name=name, llm=llm)
        elif deployed(cfg, name):
            out[name] = {"name": name, "logging_config": LOGGING, **sections[name].deployment.serve_options()}
    # The ingress keeps its own limit (serve.admission.Gate) so that a refusal is OpenAI's JSON, not
    # Serve's plain text: Serve lets every request within running + queued through to it.
    ing, d = out["ingress"], cfg.http.deployment
    if d.max_queued_requests != -1:
        ing["max_ongoing_requests"] = d.max_ongoing_requests + d.max_queued_requests
    ing["max_queued_requests"] = -1
    return out


def build_app(cfg, *, app_name: str = APP_NAME):
    """The bound Serve application for ``cfg`` (an :class:`common.config.AppConfig`); refuses an
    exposed config without keys first (:func:`check_exposure`)."""
    check_exposure(cfg)
    from ray import serve

    from deployments.generator import build_generator, llm_config
    from deployments.replicas import RerankerDeployment, RetrieverDeployment, RouterDeployment
    from serve.app import RagIngress

    llm = llm_config(cfg)
    opts = deployment_options(cfg, llm=llm)

    def stage(cls, name: str) -> Any:
        return serve.deployment(cls, **opts[name]).bind(cfg)

    router = stage(RouterDeployment, "router") if deployed(cfg, "router") else None  # None: in the ingress
    retriever = stage(RetrieverDeployment, "retriever")
    reranker = stage(RerankerDeployment, "reranker") if deployed(cfg, "reranker") else None
    generator = build_generator(llm, opts["generator"])
    ingress = serve.deployment(RagIngress, **with_metrics_folder(opts["ingress"], app_name))
    return ingress.bind(cfg, router, retriever, reranker, generator, app_name)


def with_metrics_folder(options: dict[str, Any], app_name: str) -> dict[str, Any]:
    """The ingress's options plus ``PROMETHEUS_MULTIPROC_DIR``: a folder new for this build, shared by
    the ingress replicas on each node, so that ``GET /metrics`` sums them all (flow/metrics.py)."""
    import tempfile
    import time
    import uuid

    folder = f"{tempfile.gettempdir()}/ragraph-metrics/{app_name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    actor = dict(options.get("ray_actor_options") or {})
    env = {**((actor.get("runtime_env") or {}).get("env_vars") or {}), "PROMETHEUS_MULTIPROC_DIR": folder}
    actor["runtime_env"] = {**(actor.get("runtime_env") or {}), "env_vars": env}
    return {**options, "ray_actor_options": actor}


def app_builder(args: dict[str, Any]):
    """Entry point for ``serve run`` / ``serve deploy`` configs: ``args`` is ``{"config": PATH}`` or
    the whole config tree (what ``ragraph serve --export`` writes)."""
    from common.config import AppConfig, load_config

    if set(args) <= {"config"}:
        return build_app(load_config(args.get("config")))
    return build_app(AppConfig.model_validate(args))
