"""The chat page: ``GET /`` and its static files (``GET /static/{name}``), from the
package's ``serve/static/`` folder: plain HTML, CSS and JavaScript, nothing fetched from elsewhere
and no build step.

These routes are public (their access level, :mod:`serve.routetable`): the page must load before
it can ask for a key. Everything the page then calls (``/v1/chat/completions``, ``/v1/conversations``,
``/v1/feedback``) is admitted like any other request: with auth on it sends the key the user typed,
kept in the tab's ``sessionStorage``, as ``Authorization: Bearer``; never in a URL.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi.responses import HTMLResponse, Response

from flow.errors import FlowError
from serve.routetable import PUBLIC, RouteTable

STATIC = Path(__file__).resolve().parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# The page runs only its own files and talks only to this service.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PAGE = "/"
ASSETS = "/static/{name}"
ROUTES = RouteTable()


@cache
def files() -> dict[str, bytes]:
    """The shipped files by name (read once; only these are ever served: no path from a request
    reaches the file system)."""
    return {p.name: p.read_bytes() for p in STATIC.iterdir() if p.is_file() and p.suffix in TYPES}


def _file(name: str) -> Response:
    body = files().get(name)
    if body is None:
        raise FlowError("not_found", f"no static file {name!r}", param="name", code="not_found")
    return Response(body, media_type=TYPES[Path(name).suffix], headers=HEADERS)


@ROUTES.get(PAGE, access=PUBLIC, include_in_schema=False, response_class=HTMLResponse)
async def page() -> Response:
    return _file("index.html")


@ROUTES.get(ASSETS, access=PUBLIC, include_in_schema=False, response_class=Response)
async def asset(name: str) -> Response:
    return _file(name)
