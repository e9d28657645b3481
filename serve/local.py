"""The same pipeline without Ray: the plain stage classes called directly in one process, behind
the same routes as the Serve ingress (``serve/routes.py``; uvicorn instead of Serve's proxy).

It is the other side of the graph-overhead benchmark (``load_tests/bench_graph.py``) and a way to
debug the pipeline in one process. It is not a production mode: no replicas, no autoscaling, no
backpressure, no live index swap (the index is read at start-up).

    python -m serve.local [--config FILE] [--port 8001]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from fastapi import FastAPI

from serve.metrics import METRICS
from serve.pipeline import Pipeline
from serve.routes import make_app
from serve.stages import InProcessStages


def create_app(cfg) -> FastAPI:
    stages = InProcessStages(cfg)
    pipeline = Pipeline(cfg, stages, metrics=METRICS)
    pipeline.warm_up()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await stages.start()
        try:
            yield
        finally:
            stages.stop()
            if getattr(api.state, "ingest", None) is not None:
                api.state.ingest.stop()

    api = make_app(lifespan=lifespan)
    api.state.pipeline = pipeline
    return api


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from common.config import load_config

    p = argparse.ArgumentParser(prog="python -m serve.local", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    from serve.launch import auth_notice

    cfg = load_config(args.config)
    notice = auth_notice(cfg)
    if notice:
        print(f"note: {notice}")
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
