"""Starting Ray on this machine so that a local Ray listens on loopback only (:func:`init_ray`:
``ragraph serve``'s embedded default, ``ragraph index``'s Ray Data embedding, the tests' Rays), and
the cluster this machine runs (:func:`running_cluster`).

``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray 2.60 turns a loopback
address into the machine's network address (``ray._private.services.resolve_ip_for_localhost``) unless its local-only switch is on
(``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` false, the default on macOS and Windows, read
from :data:`LOCAL_ONLY_ENV` at import). :func:`init_ray` turns it on for its one call in this
process, and in the environment of the Ray processes the call starts (GCS, raylet, agents; the
raylet's workers and job drivers inherit it). Nodes of ``ray.cluster_utils.Cluster`` take
``node_ip_address=LOOPBACK`` as it is; their processes need :data:`LOCAL_ONLY_ENV` too.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK = "127.0.0.1"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's local-only switch, read at import: "0" is on


def init_ray(address: str | None = None, **kwargs: Any) -> Any:
    """``ray.init(address, **kwargs)``, on loopback when it starts a new local Ray (``address``
    None, empty or ``"local"``: always a Ray of its own, never another session's that happens to
    be running here); a cluster's address is joined as given."""
    import ray
    import ray._private.ray_constants as ray_constants

    if address not in (None, "", "local"):
        # a cluster is joined as it is, also at a loopback address: on a cluster's head that address
        # still belongs to a cluster whose other nodes must reach this driver at its network address
        return ray.init(address=address, **kwargs)
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError(f"Ray {ray.__version__} has no ray_constants.ENABLE_RAY_CLUSTER: common/local_ray.py "
                           "cannot keep a local Ray on loopback; re-check it against this Ray")
    switch, env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(LOCAL_ONLY_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[LOCAL_ONLY_ENV] = "0"  # inherited by what ray.init starts
    try:
        return ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = switch
        if env is None:
            os.environ.pop(LOCAL_ONLY_ENV, None)
        else:
            os.environ[LOCAL_ONLY_ENV] = env


def running_cluster() -> str | None:
    """The address of the Ray cluster this machine runs (``RAY_ADDRESS``, else the one ``ray
    start`` last recorded), or None."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - none recorded, or an unreadable record: start one
        return None
