"""Routes as the HTTP layer declares them: a path, its methods, who may call it (its access level)
and FastAPI's route options, written in one place beside the endpoint:

    @ROUTES.post("/v1/search", access=USER, response_model=SearchResponse)

``serve.routes`` adds every table's routes to its one router, each with the one dependency that
admits a caller to its level (:class:`serve.admission.Access`). Access levels:

* ``public``: anyone (probes, the chat page and its files); only the request's headers are checked;
* ``user``: any key (with auth off, any caller);
* ``admin``: an admin key (with auth off, a caller on this machine);
* ``metrics``: a key of scope ``metrics`` or ``admin``, or anyone with ``governor.auth.metrics_open``.

A route's JSON body is read only after its caller is admitted (:class:`JsonBody`, a dependency:
FastAPI reads a body parameter before any dependency runs); the table puts its schema in the
route's OpenAPI operation (:data:`BODIES` holds the models for the schema's components).
"""

from __future__ import annotations

import email.message
import inspect
import json
from collections.abc import Callable
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

PUBLIC, USER, ADMIN, METRICS = "public", "user", "admin", "metrics"
LEVELS = (PUBLIC, USER, ADMIN, METRICS)
BODIES: dict[str, type[BaseModel]] = {}  # model name -> a JSON body model some route takes


class JsonBody:
    """The route's JSON body as ``model``, parsed and validated as FastAPI does a body parameter
    (the same errors, so the same 400s), from the bytes admission let in."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model

    async def __call__(self, request: Request) -> Any:
        raw = await request.body()
        value: Any = None
        if raw:
            value = raw
            kind = request.headers.get("content-type")
            if kind:
                message = email.message.Message()
                message["content-type"] = kind
                sub = message.get_content_subtype()
                if message.get_content_maintype() == "application" and (sub == "json" or sub.endswith("+json")):
                    try:
                        value = json.loads(raw)
                    except json.JSONDecodeError as e:
                        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos),
                                                       "msg": "JSON decode error", "input": {},
                                                       "ctx": {"error": e.msg}}], body=e.doc) from e
                    except Exception as e:
                        raise HTTPException(status_code=400, detail="There was an error parsing the body") from e
        if value is None:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                           "input": None}])
        try:
            return self.model.model_validate(value, from_attributes=True)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                          for err in e.errors(include_url=False)], body=value) from None


def json_body(model: type[BaseModel]) -> Any:
    """A parameter default: the route's JSON body as ``model`` (``body: ChatRequest = json_body(ChatRequest)``)."""
    return Depends(JsonBody(model))


def _request_body(endpoint: Callable[..., Any]) -> dict[str, Any] | None:
    """The OpenAPI ``requestBody`` of an endpoint that takes a :func:`json_body`."""
    for p in inspect.signature(endpoint).parameters.values():
        dep = getattr(p.default, "dependency", None)
        if isinstance(dep, JsonBody):
            BODIES[dep.model.__name__] = dep.model
            return {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{dep.model.__name__}"}}}}
    return None


class RouteTable:
    def __init__(self) -> None:
        self.routes: list[tuple[str, list[str], Any, dict[str, Any]]] = []  # (path, methods, endpoint, options)
        self.access: dict[tuple[str, str], str] = {}  # (method, path) -> access level

    def route(self, method: str, path: str, *, access: str, **options: Any) -> Callable[[Any], Any]:
        """Declare ``method path`` for callers of ``access``; ``options`` go to FastAPI's ``add_api_route``."""
        if access not in LEVELS:
            raise ValueError(f"{method} {path}: access must be one of {LEVELS}, got {access!r}")

        def add(endpoint: Any) -> Any:
            body = _request_body(endpoint)
            opts = dict(options)
            if body is not None:
                opts["openapi_extra"] = {"requestBody": body, **opts.get("openapi_extra", {})}
            if "response_model" in opts:
                opts.setdefault("response_model_exclude_unset", True)  # only what the endpoint returned
                opts.setdefault("response_class", JSONResponse)  # json.dumps renders it, not Pydantic's own JSON
            self.routes.append((path, [method], endpoint, opts))
            self.access[(method, path)] = access
            return endpoint

        return add

    def get(self, path: str, *, access: str, **options: Any) -> Callable[[Any], Any]:
        return self.route("GET", path, access=access, **options)

    def post(self, path: str, *, access: str, **options: Any) -> Callable[[Any], Any]:
        return self.route("POST", path, access=access, **options)

    def delete(self, path: str, *, access: str, **options: Any) -> Callable[[Any], Any]:
        return self.route("DELETE", path, access=access, **options)
