"""Routes declared by the modules beside :mod:`serve.routes` (documents, conversations), with the
access each needs: ``serve.routes`` adds them to its one router and checks admin scope from
:attr:`RouteTable.admin`, so a route and its access are written in one place."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class RouteTable:
    def __init__(self) -> None:
        self.routes: list[tuple[str, list[str], Any, dict[str, Any]]] = []  # (path, methods, endpoint, options)
        self.admin: set[tuple[str, str]] = set()  # (method, path) that only an admin key may call

    def route(self, method: str, path: str, *, admin: bool = False, **options: Any) -> Callable[[Any], Any]:
        """Declare ``method path``; ``options`` go to FastAPI's ``add_api_route``."""

        def add(endpoint: Any) -> Any:
            self.routes.append((path, [method], endpoint, options))
            if admin:
                self.admin.add((method, path))
            return endpoint

        return add
