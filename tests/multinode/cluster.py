"""The 2-node Ray cluster of the multinode tests: a head and a worker (``ray.cluster_utils.Cluster``,
each its own raylet and object store) on this machine's loopback, and their results file.

The head declares ``ragraph_head`` (what the generator is pinned to, as a GPU generator is pinned to
GPU nodes), the worker ``cpu_pool``. Ray's local-only mode keeps the nodes, their job drivers and
this driver on loopback: the variable for the processes Ray starts, and Ray's own constant for this
process, which read it at import and would otherwise dial the machine's address for a loopback GCS.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
MACHINE = f"{os.cpu_count()} cores, 2 Ray nodes (ray.cluster_utils.Cluster)"


@contextlib.contextmanager
def loopback_cluster(*, env: dict[str, str] | None = None, dashboard_port: int | None = None) -> Iterator[tuple[Any, Any]]:
    """(cluster, worker node) with ``env`` set in this process (and so in every Ray process it
    starts) until the end; then Serve, this driver and both nodes are shut down and the environment
    and Ray's local-only constant are put back."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray.cluster_utils import Cluster

    env = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    local_only = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    head: dict[str, Any] = {"num_cpus": 4, "resources": {"ragraph_head": 1}, "node_ip_address": LOOPBACK,
                            "include_dashboard": dashboard_port is not None}
    if dashboard_port is not None:
        head["dashboard_port"] = dashboard_port
    c = None
    try:
        c = Cluster(initialize_head=True, connect=False, head_node_args=head)
        worker = c.add_node(num_cpus=4, resources={"cpu_pool": 1000}, node_ip_address=LOOPBACK)
        c.wait_for_nodes()
        yield c, worker
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if c is not None:
                c.shutdown()
            ray_constants.ENABLE_RAY_CLUSTER = local_only
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def write_results(report: Path | None, results: dict[str, Any], rate: float) -> None:
    """``results`` into ``report`` (None: printed only), over what an earlier run (a ``-k`` one) left there."""
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        earlier = json.loads(report.read_text()).get("results", {}) if report.exists() else {}
        report.write_text(json.dumps({"machine": MACHINE, "rate_rps": rate, "results": {**earlier, **results}},
                                     indent=2))
    print("\n" + json.dumps(results, indent=2))
