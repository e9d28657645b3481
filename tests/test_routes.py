"""Routes are declared once (serve/routes.py): the in-process app publishes exactly the schema of
:func:`serve.routes.make_app`, which the Serve ingress serves too (checked live in
tests/test_serve_graph.py::test_graph_publishes_the_shared_openapi_schema)."""

from __future__ import annotations


def test_in_process_app_publishes_the_shared_schema(local_cfg, built_index):
    from common.config import AppConfig
    from serve.local import create_app
    from serve.routes import make_app

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    local = create_app(AppConfig.model_validate(data))  # not started: no engine needed for the schema
    schema = local.openapi()
    assert schema == make_app().openapi()
    paths = set(schema["paths"])
    assert {"/v1/chat/completions", "/v1/search", "/v1/models", "/health/ready", "/metrics"} <= paths


def test_a_route_missing_from_one_app_is_seen():
    """The comparison can fail: an app with one route fewer publishes a different schema."""
    from fastapi import FastAPI

    from serve.routes import TITLE, VERSION, make_app, router

    partial = FastAPI(title=TITLE, version=VERSION, description=make_app().description)
    partial.include_router(router)
    partial.router.routes = [r for r in partial.router.routes if getattr(r, "path", "") != "/v1/search"]
    assert partial.openapi() != make_app().openapi()
