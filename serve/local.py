"""The same pipeline without Ray: the plain stage classes called directly in one process, behind
the same routes as the Serve ingress (``serve/routes.py``; uvicorn instead of Serve's proxy).

It is the other side of the graph-overhead benchmark (``load_tests/bench_graph.py``) and a way to
debug the pipeline in one process. It is not a production mode: no replicas, no autoscaling, no
backpressure, no live index swap (the index is read at start-up). Like the graph builder it refuses
to serve with auth off beyond loopback unless told to (``serve.graph.check_exposure``; ``--insecure``).

    python -m serve.local [--config FILE] [--host 127.0.0.1] [--port 8001] [--insecure]
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from fastapi import FastAPI

from serve.graph import check_exposure
from flow.metrics import METRICS
from flow.pipeline import Pipeline
from serve.routes import make_app
from serve.stages import InProcessStages


def create_app(cfg) -> FastAPI:
    """The in-process app for ``cfg``, listening as ``cfg.http.host`` says; raises
    :class:`serve.graph.ExposureError` for auth off beyond loopback without ``http.insecure_auth_off``."""
    check_exposure(cfg)
    stages = InProcessStages(cfg)
    pipeline = Pipeline(cfg, stages, metrics=METRICS)
    pipeline.warm_up()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await stages.start()
        pipeline.governor.conversations.start_purging(cfg.governor.conversations.purge_interval_s)
        try:
            yield
        finally:
            pipeline.governor.conversations.stop_purging()
            pipeline.stop()
            stages.stop()

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
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host with auth off (anyone who reaches the port may use the service)")
    args = p.parse_args(argv)
    from serve.launch import LaunchError, auth_notice, check_exposure as launch_check

    cfg = load_config(args.config)
    cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={"host": args.host})})  # what uvicorn binds
    try:
        cfg = launch_check(cfg, insecure=args.insecure)
    except LaunchError as e:
        raise SystemExit(f"error: {e}") from None
    notice = auth_notice(cfg)
    if notice:
        print(f"note: {notice}")
    uvicorn.run(create_app(cfg), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
