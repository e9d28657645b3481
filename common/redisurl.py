"""The Redis URL a process connects with: the configured URL (``governor.rate_limits.storage``,
``governor.cache.storage``), with the password taken from the environment variable
``RAGRAPH_REDIS_PASSWORD`` when the URL carries none. A cluster's manifests and its Serve config
then name only ``redis://host:port``; the password reaches the replicas from a Secret
(``ragraph kuberay`` wires ``<name>-redis``, the one the GCS uses)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import quote, urlsplit, urlunsplit

REDIS_PASSWORD_ENV = "RAGRAPH_REDIS_PASSWORD"
SCHEMES = ("redis", "rediss")


def with_password(url: str, env: Mapping[str, str] | None = None) -> str:
    """``url`` with the password of :data:`REDIS_PASSWORD_ENV` added, when it is a redis:// or
    rediss:// URL without one and the variable is set and not empty; otherwise ``url`` unchanged
    (a password written in the URL wins)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        return url
    password = (os.environ if env is None else env).get(REDIS_PASSWORD_ENV, "")
    if not password or parts.password is not None:
        return url
    user, sep, host = parts.netloc.rpartition("@")
    netloc = f"{user if sep else ''}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def without_password(url: str) -> str:
    """``url`` with any password replaced by ``***``: for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.partition(":")[0]
    return urlunsplit((parts.scheme, f"{name}:***@{host}", parts.path, parts.query, parts.fragment))
