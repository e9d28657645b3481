"""The Serve ingress: :func:`serve.routes.make_app`'s FastAPI app behind ``@serve.ingress``, with a
pipeline over the stages' deployment handles. The routes themselves are declared once, in
``serve/routes.py``; the graph is built by :func:`serve.graph.build_app`."""

from __future__ import annotations

from ray import serve as ray_serve

from serve.metrics import METRICS
from serve.pipeline import Pipeline
from serve.routes import make_app
from serve.stages import HandleStages

app = make_app()


@ray_serve.ingress(app)
class RagIngress:
    def __init__(self, cfg, router, retriever, reranker, generator, governor, app_name: str = "ragraph") -> None:
        stages = HandleStages(app_name=app_name, router=router, retriever=retriever, reranker=reranker,
                              generator=generator, governor=governor)
        self.cfg = cfg
        self.pipeline = Pipeline(cfg, stages, metrics=METRICS)
        self.pipeline.warm_up()
        app.state.pipeline = self.pipeline  # one ingress per process
