"""The API's documentation pages: ``GET /docs`` (Swagger UI) and ``GET /redoc`` (ReDoc), and their
files (``GET /docs/assets/{name}``).

Nothing is fetched from elsewhere: the scripts and styles are the copies that the pinned
``fastapi-offline`` package ships (Swagger UI 5.32.6, ReDoc 2.5.3), served from this origin, each
checked at first use against the sha256 recorded below (a package upgrade that changes them is
refused until they are recorded again) and named in the page with its Subresource Integrity hash.
The pages carry a Content-Security-Policy that runs only this origin's scripts (``script-src
'self'``; Swagger UI's start-up call is a file here, not an inline script) and talks only to this
service. ReDoc writes its styles into ``<style>`` elements and searches in a worker made from a
``blob:`` URL, so ``/redoc`` allows inline styles and blob workers (never inline scripts); the
policy blocks the one image ReDoc asks of its own CDN (its logo).

The routes are admitted like every other route (access level ``user``): behind the key when auth is on.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from html import escape
from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse, Response

from flow.errors import FlowError
from serve.routetable import USER, RouteTable

ROUTES = RouteTable()
SWAGGER = "/docs"
REDOC = "/redoc"
ASSETS = "/docs/assets/{name}"
OPENAPI = "/openapi.json"

# fastapi-offline 1.7.7's files (pyproject pins the version): name -> sha256
PINNED = {
    "swagger-ui-bundle.js": "4b5a9b35a1adf37f00d39c0bae23cdb37007e2946240ef035137cc85b4d55349",
    "swagger-ui.css": "ca238f7d7c2cf4480c1e77a9c3b9da915ab216e96ffd354e69076560c650c6de",
    "redoc.standalone.js": "1320f442151c57c447d3b70c7ffc6c4f86d08464020fe34c8cc5d3164e9944f0",
    "favicon.png": "d16f72cf5a2773eba499cc7f3db1923c6f5f73de990f739e3a05806aafec15b7",
}
# Swagger UI's start-up, with FastAPI's default parameters (and no badge from Swagger's online validator)
START = (
    'window.ui = SwaggerUIBundle({url: "' + OPENAPI + '", dom_id: "#swagger-ui", layout: "BaseLayout", '
    "deepLinking: true, showExtensions: true, showCommonExtensions: true, validatorUrl: null, "
    "presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]});\n"
).encode()
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png",
         ".html": "text/html; charset=utf-8"}
_POLICY = ("default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; font-src 'self'; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CSP = {SWAGGER: f"{_POLICY}; style-src 'self'",
       REDOC: f"{_POLICY}; style-src 'self' 'unsafe-inline'; worker-src blob:"}
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


class AssetsChanged(RuntimeError):
    """The installed documentation files are not the pinned ones."""


@cache
def assets() -> dict[str, bytes]:
    """The pinned files by name (read and checked once; only these names are ever served)."""
    try:
        import fastapi_offline
    except ImportError as e:
        raise AssetsChanged("the API documentation needs the package fastapi-offline (pip install "
                            "'fastapi-offline==1.7.7')") from e
    folder = Path(fastapi_offline.__file__).resolve().parent / "static"
    out = {}
    for name, digest in PINNED.items():
        body = (folder / name).read_bytes() if (folder / name).is_file() else b""
        if hashlib.sha256(body).hexdigest() != digest:
            raise AssetsChanged(f"fastapi-offline's {name} is not the pinned file (sha256 {digest[:12]}…): "
                                "record the new files' sha256 in serve/apidocs.PINNED after checking them")
        out[name] = body
    return {**out, "swagger-start.js": START}


def integrity(body: bytes) -> str:
    """The Subresource Integrity value of ``body``."""
    return "sha384-" + base64.b64encode(hashlib.sha384(body).digest()).decode()


@cache
def _integrities() -> dict[str, str]:
    return {name: integrity(body) for name, body in assets().items()}


def _files() -> dict[str, bytes]:
    try:
        return assets()
    except AssetsChanged as e:
        raise FlowError("unavailable", f"the API documentation is unavailable: {e}", code="docs_unavailable") from None


def _tag(name: str) -> str:
    url = ASSETS.format(name=name)
    sri = _integrities()[name]
    if name.endswith(".css"):
        return f'<link rel="stylesheet" href="{url}" integrity="{sri}">'
    return f'<script src="{url}" integrity="{sri}"></script>'


def _page(path: str, title: str, body: str) -> Response:
    html = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="{ASSETS.format(name="favicon.png")}">{body}</html>\n')
    return Response(html, media_type=TYPES[".html"], headers={**HEADERS, "Content-Security-Policy": CSP[path]})


@ROUTES.get(SWAGGER, access=USER, include_in_schema=False, response_class=HTMLResponse)
async def swagger_page(request: Request) -> Response:
    _files()  # 503 when the installed files are not the pinned ones
    title = f"{request.app.title} API"
    return _page(SWAGGER, title, f'{_tag("swagger-ui.css")}</head><body><div id="swagger-ui"></div>'
                                 f'{_tag("swagger-ui-bundle.js")}{_tag("swagger-start.js")}</body>')


@ROUTES.get(REDOC, access=USER, include_in_schema=False, response_class=HTMLResponse)
async def redoc_page(request: Request) -> Response:
    _files()  # 503 when the installed files are not the pinned ones
    title = f"{request.app.title} API"
    return _page(REDOC, title, f'</head><body><redoc spec-url="{OPENAPI}"></redoc>'
                               f'{_tag("redoc.standalone.js")}</body>')


@ROUTES.get(ASSETS, access=USER, include_in_schema=False, response_class=Response)
async def asset(name: str) -> Response:
    body = _files().get(name)
    if body is None:
        raise FlowError("not_found", f"no documentation file {name!r}", param="name", code="not_found")
    return Response(body, media_type=TYPES[Path(name).suffix],  # pinned: a day in the browser's cache
                    headers={**HEADERS, "Cache-Control": "private, max-age=86400"})
