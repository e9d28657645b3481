"""The Serve ingress: :func:`serve.routes.make_app`'s FastAPI app behind ``@serve.ingress``, with a
pipeline over the stages' deployment handles. The routes themselves are declared once, in
``serve/routes.py`` (the in-process app, ``serve/local.py``, serves the same); the graph is built
by :func:`serve.graph.build_app`."""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve as ray_serve

from deployments.router import QueryRouter
from flow.metrics import METRICS
from flow.pipeline import Pipeline
from serve.routes import make_app
from serve.stages import HandleStages


def replica_id() -> str:
    """This Serve replica's id; ``"ingress"`` when the class is built outside a replica (tests)."""
    from ray.serve.exceptions import RayServeException

    try:
        return ray_serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return "ingress"


@ray_serve.ingress()
class RagIngress:
    def __init__(self, cfg, router, retriever, reranker, generator, app_name: str = "ragraph") -> None:
        replica = replica_id()
        if router is None:  # router.placement: ingress: the plain class in this replica
            router = QueryRouter.from_config(cfg)
        stages = HandleStages(app_name=app_name, router=router, retriever=retriever, reranker=reranker,
                              generator=generator, replica=replica)
        self.cfg = cfg
        METRICS.export_to_ray()  # every replica's series reach Ray's metrics agent (flow/metrics.py)
        # the service's state is the shared database's, opened (and its schema upgraded) here
        self.pipeline = Pipeline(cfg, stages, metrics=METRICS)
        self.pipeline.calls.replica = replica
        self.pipeline.warm_up()
        self.pipeline.governor.conversations.start_purging(cfg.governor.conversations.purge_interval_s)
        self.pipeline.ingest()  # this replica's job runner: a job interrupted by a lost replica is taken over

    def __del__(self) -> None:
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None:
            pipeline.stop()

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve asks for the app once the constructor has run: this replica's own, with its pipeline."""
        app = make_app()
        app.state.pipeline = self.pipeline
        return app
