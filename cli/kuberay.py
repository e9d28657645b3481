"""The KubeRay ``RayService`` manifest, generated from the typed config (``ragraph kuberay``).

One manifest holds the whole service: ``spec.serveConfigV2`` is the Serve config that
``ragraph serve --export`` writes (the app builder plus the whole config tree as its args), and
``spec.rayClusterConfig`` is a Ray cluster of three node groups (the node types of cluster.yaml):

* ``head``: Ray ``CPU: 4`` and no custom resource (no stage is pinned there): the GCS, the Serve
  controller, a proxy, the dashboard, job supervisors;
* ``cpu`` workers: ``cpu_pool: 1000``, for the stages that ask for ``cpu_pool`` (ingress, router)
  and the driver of index jobs;
* ``gpu`` workers: one NVIDIA L4 each, for the stages that ask for GPUs.

No pod keeps state of its own. Every ingress replica opens the state database ``state.url`` itself
(keys, usage, conversations, ingest jobs): it must be a PostgreSQL that all of them share, so a
config whose ``state.url`` is unset (the SQLite file ``governor.db``) or SQLite is refused; so is
``memory://`` for ``governor.rate_limits.storage`` or ``governor.cache.storage`` with more than one
ingress replica (each would count and cache for itself: they must share a Redis). The database's
password never enters the manifest (a ``state.url`` that carries one is refused): every Ray
container gets ``RAGRAPH__STATE__URL``, the whole URL, from the Secret ``<name>-state`` (key
``url``, :func:`state_secret`), which the operator of the service creates.

The GCS is fault tolerant (``rayClusterConfig.gcsFaultToleranceOptions``, KubeRay >= 1.3): it keeps
the cluster's tables in Redis, so a head pod that restarts finds the cluster, its actors and the Serve
application again instead of restarting every worker. Its ``redisAddress`` is derived from the config
(:func:`gcs_redis_address`): the host:port of ``governor.rate_limits.storage`` (``rediss://host:port``
for TLS), else of ``governor.cache.storage``; the password comes from the Secret ``<name>-redis``
(key ``password``, :func:`redis_secret`), which every Ray container also gets as
``RAGRAPH_REDIS_PASSWORD`` (:mod:`common.redisurl`): the ingress replicas' limits and cache
connect to ``redis://host:port`` with it, so no Redis URL in the config carries a password (one
that does is refused). KubeRay keeps the tables under the RayCluster's UID in Redis
and deletes them when the RayCluster is deleted (its Redis clean-up Job).

Every pod mounts the ReadWriteMany volume ``ragraph-shared`` at ``/mnt/shared`` (indexes, models,
corpus) and runs one image: Ray's GPU image with this repository installed as ``.[gpu]``
(configs/kuberay/README.md). KubeRay creates the Service ``<name>-serve-svc`` on port
``http.port`` (8000), in front of every pod whose Serve proxy is up.

Ray's token authentication is on (``rayClusterConfig.authOptions``: ``mode: token`` with the token
from the Secret ``<name>-ray-auth``, key ``auth_token``, which the operator does not create); KubeRay
sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` in every Ray container and sends the token itself
when it calls the dashboard. A ``NetworkPolicy`` (:func:`network_policy`) lets into the Ray pods only
the Serve port from anywhere, everything from the Ray pods of the same RayService, the dashboard from
namespaces labelled ``ragraph.io/ray-operator=true`` (the KubeRay operator's) and from the re-index
CronJob's pods (their own label, :func:`reindex_labels`), and the metrics port from namespaces
labelled ``ragraph.io/metrics-scraper=true``; out of them only the same Ray pods, the cluster DNS and
what the config needs (:func:`config_egress`: the ports of the state database and of Redis), and
from the head HTTPS beyond the cluster (:func:`head_egress_policy`: the API server, the model hub).
The CronJob's pods have a policy of their own (:func:`reindex_network_policy`).

Every pod runs restricted (:func:`pod_security`, :func:`container_security`: uid 1000, no privilege
escalation, no capability, RuntimeDefault seccomp; read-only root filesystems for the job
containers) with ``automountServiceAccountToken: false``; only KubeRay's autoscaler sidecar gets
the head's ServiceAccount token (:func:`autoscaler_token_volume`). Hub models must be pinned to a
commit (``models.<role>.revision``), and auth off is refused as the app builder refuses it.

The worker groups' bounds are derived from the config (:func:`group_bounds`); the output is
deterministic (no timestamps, no machine paths) so that the committed copy can be checked.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import SplitResult, urlsplit

import yaml

from common.config import REPO_ROOT, AppConfig
from common.redisurl import REDIS_PASSWORD_ENV

SHARED_CLAIM = "ragraph-shared"
SHARED_MOUNT = PurePosixPath("/mnt/shared")
POD_HOME = PurePosixPath("/home/ray")  # the Ray images' user `ray` (uid 1000, gid 100)
PYTHON_TAG = "py311"  # requires-python in pyproject.toml
ACCELERATOR = "L4"  # what the gpu group's nodes carry (Ray's accelerator type name)
GPU_RESOURCE = "nvidia.com/gpu"
ACCEL_PREFIX = "accelerator_type:"
KUBERAY_MIN = "1.6"  # upgradeStrategy (1.2); gcsFaultToleranceOptions (1.3); authOptions (1.5.1) with secretName (1.6)
# Ray's ports on the head (KubeRay's defaults) and the metrics agent's.
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT, METRICS_PORT = 6379, 8265, 10001, 8080
# The namespace labels that let the KubeRay operator (the dashboard: it deploys serveConfigV2 and polls
# its status there) and a Prometheus (the metrics port) through the NetworkPolicy. Labels on namespaces
# need cluster-level rights to set, unlike pod labels.
OPERATOR_NS_LABEL = {"ragraph.io/ray-operator": "true"}
SCRAPER_NS_LABEL = {"ragraph.io/metrics-scraper": "true"}
# The cluster DNS (CoreDNS or kube-dns: the label both carry in kube-system), the one in-cluster service
# every pod may reach besides its own; NodeLocal DNSCache listens on a link-local address instead.
DNS_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
# What the head reaches beyond the cluster on HTTPS: the Kubernetes API server (KubeRay's autoscaler
# sidecar scales the worker groups through it; the API server is no pod, so no selector can name it;
# 443, or 6443 where the endpoint listens there) and, for hub models, the model hub (the models init
# container). Never the cloud's instance metadata service (link-local: credentials of the node).
API_PORTS = (443, 6443)
ANYWHERE = ({"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]},
            {"cidr": "::/0", "except": ["fe80::/10", "fd00:ec2::254/128"]})
# The Ray images' user `ray`; every container runs as it, never as root.
RAY_UID, RAY_GID = 1000, 100
# Where the projected ServiceAccount token is mounted into the autoscaler sidecar only: the path the Ray
# autoscaler reads it from (ray.autoscaler._private.kuberay.node_provider.IN_CLUSTER_TOKEN_PATH).
SA_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
COMMIT = re.compile(r"[0-9a-f]{40}")
# What an index job's driver (chunking, BM25 and FAISS builds) asks for, as cluster.yaml submits it:
# `ray job submit --entrypoint-num-cpus 4 --entrypoint-resources '{"cpu_pool": 1}'`, on a cpu worker.
INDEX_DRIVER = {"CPU": 4, "cpu_pool": 1}


class KubeRayError(ValueError):
    """The config cannot run on the KubeRay cluster as described; the message lists every problem."""


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """One Ray node group: the pod's Kubernetes shape and what Ray is told it offers.

    Pods ask for a little less than the machine (``machine``) so that the kubelet's reservation,
    the daemon sets and, on the head, KubeRay's autoscaler sidecar (500m, 512Mi) still fit."""

    name: str
    machine: str
    cpu: int  # the Ray container's CPU request = limit
    memory_gib: int  # request = limit; Ray takes its memory from the limit
    ray_cpus: int  # `num-cpus`: what Ray schedules against
    gpus: int = 0
    resources: Mapping[str, int] = field(default_factory=dict)  # custom Ray resources

    def capacity(self, extra: Mapping[str, int] | None = None) -> dict[str, float]:
        """What Ray schedules against on one pod (``extra``: accelerator-type resources)."""
        return {"CPU": self.ray_cpus, **({"GPU": self.gpus} if self.gpus else {}), **self.resources, **(extra or {})}


HEAD = NodeGroup("head", "8 vCPU, 32 GiB", cpu=6, memory_gib=26, ray_cpus=4)  # no stage asks for it
CPU_WORKERS = NodeGroup("cpu", "16 vCPU, 64 GiB", cpu=15, memory_gib=56, ray_cpus=15, resources={"cpu_pool": 1000})
GPU_WORKERS = NodeGroup("gpu", "1x NVIDIA L4, 16 vCPU, 64 GiB", cpu=15, memory_gib=56, ray_cpus=15, gpus=1)
GROUPS = (HEAD, CPU_WORKERS, GPU_WORKERS)


@dataclass(frozen=True, slots=True)
class StageNeed:
    """What one replica of a stage asks of Ray (its bundles; one bundle unless it has a placement
    group), and how many replicas it runs at the least and at the most."""

    stage: str
    bundles: tuple[Mapping[str, float], ...]
    min_replicas: int
    max_replicas: int

    def per_replica(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for b in self.bundles:
            for r, v in b.items():
                total[r] = total.get(r, 0) + v
        return total

    def custom(self) -> set[str]:
        """Custom resources asked for (accelerator types aside)."""
        standard = ("CPU", "GPU", "memory")
        return {r for b in self.bundles for r in b if r not in standard and not r.startswith(ACCEL_PREFIX)}


@dataclass(frozen=True, slots=True)
class GroupBounds:
    """A worker group's pod bounds and the totals they were derived from."""

    min_replicas: int
    max_replicas: int
    min_need: dict[str, float]
    max_need: dict[str, float]
    stages: tuple[str, ...]


def _bundle(resources: Mapping[str, Any]) -> dict[str, float]:
    return {r: float(v) for r, v in resources.items() if v}


def stage_needs(cfg: AppConfig) -> list[StageNeed]:
    """Every Serve deployment's needs (from :func:`serve.graph.deployment_options`, without
    starting Ray), plus the index job: its Ray Data embedder actors (``indexing.concurrency``, each
    ``threads_per_actor`` CPUs and, with ``embedder.device: cuda``, ``gpus_per_actor`` GPUs) and its
    driver (:data:`INDEX_DRIVER`)."""
    from serve.graph import deployment_options

    needs: list[StageNeed] = []
    for name, o in deployment_options(cfg).items():
        auto = o.get("autoscaling_config") or {}
        lo = auto.get("min_replicas", o.get("num_replicas", 1))
        hi = auto.get("max_replicas", o.get("num_replicas", 1))
        pg = o.get("placement_group_bundles")
        if pg:  # the replica actor runs inside the first bundle: the bundles are the whole need
            bundles = tuple(_bundle(b) for b in pg)
        else:
            a = o.get("ray_actor_options", {})
            b = {"CPU": a.get("num_cpus", 1), "GPU": a.get("num_gpus", 0), **a.get("resources", {})}
            if a.get("accelerator_type"):
                b[ACCEL_PREFIX + a["accelerator_type"]] = 0.001
            bundles = (_bundle(b),)
        needs.append(StageNeed(name, bundles, lo, hi))
    ix = cfg.indexing
    if ix.engine != "local":
        gpus = ix.gpus_per_actor if cfg.embedder.device == "cuda" else 0
        actor = _bundle({"CPU": ix.threads_per_actor, "GPU": gpus})
        needs.append(StageNeed("index actors", (actor,), 0, ix.concurrency))
    needs.append(StageNeed("index driver", (_bundle(INDEX_DRIVER),), 0, 1))
    return needs


def _accelerators(needs: Iterable[StageNeed]) -> dict[str, int]:
    return {r: 1 for n in needs for b in n.bundles for r in b if r.startswith(ACCEL_PREFIX)}


def _place(needs: list[StageNeed], errors: list[str]) -> dict[str, list[StageNeed]]:
    """Which group each stage runs on: the group offering its custom resources; else the gpu group
    when it needs GPUs; else the cpu group (a stage pinned nowhere may also land on the head or a
    gpu pod, so counting it on the cpu group is the safe side)."""
    placed: dict[str, list[StageNeed]] = {g.name: [] for g in GROUPS}
    accel = _accelerators(needs)
    for n in needs:
        custom = n.custom()
        if custom:
            group = next((g for g in GROUPS if custom <= set(g.resources)), None)
            if group is None:
                offered = ", ".join(f"{g.name}: {sorted(g.resources) or '-'}" for g in GROUPS)
                errors.append(f"{n.stage} asks for {sorted(custom)}, which no node group offers ({offered})")
                continue
        else:
            group = GPU_WORKERS if n.per_replica().get("GPU") else CPU_WORKERS
        cap = group.capacity(accel if group is GPU_WORKERS else {})
        for b in n.bundles:
            over = {r: v for r, v in b.items() if v > cap.get(r, 0)}
            if over:
                errors.append(f"{n.stage}: one replica's bundle {b} does not fit a {group.name} pod, "
                              f"which offers {cap}")
        placed[group.name].append(n)
    bad = sorted({r[len(ACCEL_PREFIX):] for r in accel} - {ACCELERATOR})
    if bad:
        errors.append(f"accelerator_type {bad}: the gpu group's nodes carry {ACCELERATOR!r}")
    return placed


def _total(needs: Iterable[StageNeed], replicas: str) -> dict[str, float]:
    total: dict[str, float] = {}
    for n in needs:
        for r, v in n.per_replica().items():
            total[r] = round(total.get(r, 0) + getattr(n, replicas) * v, 6)
    return {r: v for r, v in total.items() if v}


def pack(needs: Iterable[StageNeed], cap: Mapping[str, float], *, replicas: str) -> int:
    """The pods of capacity ``cap`` that hold every stage's ``replicas`` ('min_replicas' or
    'max_replicas'), first-fit decreasing by (GPU, CPU), one item per placement bundle. The first
    two replicas of a stage with ``min_replicas >= 2`` go to different pods (Serve spreads
    replicas over nodes; two replicas are there so that a lost node leaves one answering)."""
    items = [(n, i, j, b) for n in needs for i in range(getattr(n, replicas)) for j, b in enumerate(n.bundles)]
    items.sort(key=lambda it: (-it[3].get("GPU", 0), -it[3].get("CPU", 0)))
    pods: list[tuple[dict[str, float], set[str]]] = []
    for n, i, j, b in items:
        apart = n.min_replicas >= 2 and i < 2 and j == 0

        def fits(pod: tuple[dict[str, float], set[str]]) -> bool:
            free, held = pod
            return not (apart and n.stage in held) and all(free.get(r, 0) + 1e-9 >= v for r, v in b.items())

        pod = next((p for p in pods if fits(p)), None)
        if pod is None:
            pod = (dict(cap), set())
            pods.append(pod)
        for r, v in b.items():
            pod[0][r] = pod[0].get(r, 0) - v
        pod[1].add(n.stage)
    return len(pods)


def group_bounds(cfg: AppConfig) -> dict[str, GroupBounds]:
    """The ``cpu`` and ``gpu`` worker groups' ``minReplicas`` / ``maxReplicas``.

    Sizing rule, per group, over the stages placed on it (:func:`_place`), with what Ray is told
    one pod offers (:class:`NodeGroup`: 15 CPUs, and one GPU on a gpu pod):

    * ``minReplicas`` = the pods that hold every stage at its ``min_replicas`` (:func:`pack`:
      each replica's placement bundles, e.g. the generator's one ``GPU: 1`` bundle per
      tensor-parallel worker with its CPUs merged in, and a stage's first two replicas on
      different pods);
    * ``maxReplicas`` = the same at ``max_replicas``, plus the index job (its embedder actors on
      the gpu group with a cuda embedder, its driver on the cpu group), and never below the minimum.

    The summed needs (``min_need``/``max_need``, in the manifest's header) are the lower bound
    the packing starts from: a pod holding a whole-GPU generator has no GPU left for the
    quarter-GPU retrievers, so gpu.yaml's 1.75 GPUs at min_replicas take 3 pods, not 2.
    The head is not sized: it offers no custom resource, so no stage is placed there.
    Raises :class:`KubeRayError` listing every stage that cannot be placed."""
    errors: list[str] = []
    needs = stage_needs(cfg)
    placed = _place(needs, errors)
    if errors:
        raise KubeRayError(_errors(errors))
    out: dict[str, GroupBounds] = {}
    accel = _accelerators(needs)
    for g in (CPU_WORKERS, GPU_WORKERS):
        stages = placed[g.name]
        cap = g.capacity(accel if g is GPU_WORKERS else {})
        lo = pack(stages, cap, replicas="min_replicas")
        hi = max(pack(stages, cap, replicas="max_replicas"), lo)
        out[g.name] = GroupBounds(lo, hi, _total(stages, "min_replicas"), _total(stages, "max_replicas"),
                                  tuple(n.stage for n in stages))
    return out


def _errors(errors: list[str]) -> str:
    return f"{len(errors)} problem(s) for KubeRay:\n" + "\n".join(f"  - {e}" for e in errors)


def pod_config(cfg: AppConfig) -> AppConfig:
    """``cfg`` as the pods get it (serveConfigV2's args). ``governor.db`` is not used there (the state is
    in ``state.url``'s PostgreSQL, uploads wait in ``documents.spool_dir`` on the shared volume, both
    checked), and a config for the cluster need not set it: when it is a path under this machine's home
    (the default ``~/.cache/ragraph/governor.sqlite3`` as expanded here), it is written as the pods expand
    it, under their home (/home/ray), so that the output does not depend on this machine. Any other
    value is kept as given."""
    home = Path.home()
    db = Path(cfg.governor.db)
    if str(home) in ("/", str(POD_HOME)) or not db.is_relative_to(home):
        return cfg
    governor = cfg.governor.model_copy(update={"db": Path(POD_HOME / db.relative_to(home).as_posix())})
    return cfg.model_copy(update={"governor": governor})


def _check_paths(cfg: AppConfig) -> list[str]:
    """The config must name the pods' paths: the index and the upload spool where every pod reads them,
    and nothing that only exists on this machine."""
    errors: list[str] = []
    if not PurePosixPath(cfg.indexing.dir).is_relative_to(SHARED_MOUNT):
        errors.append(f"indexing.dir={cfg.indexing.dir} is not under {SHARED_MOUNT}: the index job writes it and "
                      "every retriever pod reads it, so it must be on the shared volume")
    spool = cfg.documents.spool_dir
    if spool is None or not PurePosixPath(spool).is_relative_to(SHARED_MOUNT):
        errors.append(f"documents.spool_dir={spool}: an upload waits there until an ingress replica's job runner "
                      f"takes it, on any pod, so it must be on the shared volume (under {SHARED_MOUNT})")
    if cfg.http.host not in ("0.0.0.0", "::"):
        errors.append(f"http.host={cfg.http.host!r}: the serve Service reaches the proxies on the pods' addresses; "
                      "use 0.0.0.0")
    from serve.graph import exposure_problem

    exposed = exposure_problem(cfg)  # the same check the app builder makes on the cluster
    if exposed:
        errors.append(f"governor.auth.enabled=false on the pods' network: {exposed}")
    if not PurePosixPath(cfg.models.dir).is_relative_to(SHARED_MOUNT):
        errors.append(f"models.dir={cfg.models.dir} is not under {SHARED_MOUNT}: the head's init container fills it "
                      "and every engine reads it, so it must be on the shared volume")
    for role in ("embedder", "generator", "reranker"):
        spec = getattr(cfg.models, role)
        if spec is not None and spec.source == "hub" and not COMMIT.fullmatch(spec.revision or ""):
            errors.append(
                f"models.{role}.revision={spec.revision!r}: a hub model ({spec.name}) must be pinned to a commit "
                "(40 hex digits) so that every pod and every restart downloads the same weights and code, not "
                "whatever the branch or tag points to then; the commit of main: `python -c \"from huggingface_hub "
                f"import model_info; print(model_info('{spec.name}').sha)\"`")
    home = str(Path.home())
    local = [str(REPO_ROOT)] + ([home] if home not in ("/", str(POD_HOME)) else [])
    for key, value in _strings(cfg.model_dump(mode="json")):
        if any(value == p or value.startswith(p + "/") for p in local):
            errors.append(f"{key}={value} is a path on this machine ('~' or a relative path expanded here); "
                          "give the path on the pods")
    return errors


REDIS_SCHEMES = ("redis", "rediss")
PG_SCHEMES = ("postgresql", "postgresql+psycopg")
PG_PORT, REDIS_PORT = 5432, 6379  # the defaults of a URL without a port


def _redis(storage: str) -> SplitResult | None:
    u = urlsplit(storage)
    return u if u.scheme in REDIS_SCHEMES else None


def gcs_redis_address(cfg: AppConfig) -> str | None:
    """The Redis the GCS keeps its tables in (``gcsFaultToleranceOptions.redisAddress``): the host and
    port of ``governor.rate_limits.storage`` (the ingress replicas' shared counters), else of
    ``governor.cache.storage``; ``host:port``, or ``rediss://host:port`` for TLS (Ray reads both forms).
    The database number of the URL does not apply: the GCS writes database 0 under a key prefix of its
    own (KubeRay's: the RayCluster's UID). None when neither storage is a Redis."""
    for storage in (cfg.governor.rate_limits.storage, cfg.governor.cache.storage):
        u = _redis(storage)
        if u is not None:
            host = f"[{u.hostname}]" if ":" in (u.hostname or "") else u.hostname
            address = f"{host}:{u.port or REDIS_PORT}"
            return f"rediss://{address}" if u.scheme == "rediss" else address
    return None


def _check_state(cfg: AppConfig, name: str) -> list[str]:
    """The service's state on pods: one PostgreSQL every ingress replica shares (its password from the
    Secret, never in the config), Redis for the counters and the cache when there are several ingress
    replicas, and a Redis for the GCS. (common.config already refuses memory:// rate limits with auth on
    and several ingress replicas; what is checked here is what a config for one machine may still hold.)"""
    errors: list[str] = []
    secret = state_secret(name)
    url = cfg.state.url
    hint = (f"set state.url to postgresql+psycopg://USER@HOST:{PG_PORT}/DB without the password; the pods get the "
            f"whole URL as RAGRAPH__STATE__URL from the Secret {secret} (key url)")
    if url is None:
        errors.append(f"state.url is unset: every pod would open a SQLite file of its own (governor.db="
                      f"{cfg.governor.db}), so the ingress replicas would not share keys, usage or jobs; {hint}")
    else:
        u = urlsplit(url)
        if u.scheme not in PG_SCHEMES:
            errors.append(f"state.url={url}: {u.scheme} is one machine's file; the ingress replicas on several pods "
                          f"need one PostgreSQL they all share; {hint}")
        elif u.password is not None:
            errors.append(f"state.url carries a password, which would be written into serveConfigV2 (and into any "
                          f"copy of the manifest); {hint}")
    ingress = cfg.http.deployment.max_replicas
    gov = cfg.governor
    for key, section in (("governor.rate_limits", gov.rate_limits), ("governor.cache", gov.cache)):
        storage = section.storage
        if section.enabled and ingress > 1 and storage.startswith("memory://"):
            errors.append(f"{key}.storage is memory:// with up to {ingress} ingress replicas "
                          "(http.deployment.max_replicas): each replica would keep its own, on its own pod; "
                          "set it to redis://host:port, shared by every replica")
        r = _redis(storage)
        if r is not None and r.password is not None:
            errors.append(f"{key}.storage carries a password, which would be written into serveConfigV2; "
                          "give the Redis URL without it")
    if gcs_redis_address(cfg) is None:
        errors.append("neither governor.rate_limits.storage nor governor.cache.storage is a redis:// URL: the GCS "
                      "keeps its tables in that Redis (gcsFaultToleranceOptions), so that a restarted head pod "
                      "finds the cluster and the Serve application again")
    return errors


def _strings(tree: Any, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _strings(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _strings(v, f"{key}[{i}]")
    elif isinstance(tree, str):
        yield key, tree


def _pyproject() -> dict[str, Any]:
    path = REPO_ROOT / "pyproject.toml"
    return tomllib.loads(path.read_text()) if path.is_file() else {}


def project_version() -> str:
    """The ragraph version (pyproject.toml, else the installed package)."""
    return _pyproject().get("project", {}).get("version") or metadata.version("ragraph")


def ray_version() -> str:
    """Ray's version as pinned in pyproject.toml (what the image installs), else the installed one."""
    for spec in _pyproject().get("project", {}).get("optional-dependencies", {}).get("stack", []):
        m = re.fullmatch(r"ray(\[[^\]]*\])?==([\w.]+)", spec.replace(" ", ""))
        if m:
            return m.group(2)
    return metadata.version("ray")


def base_image() -> str:
    """The Ray image the app image is built from."""
    return f"rayproject/ray:{ray_version()}-{PYTHON_TAG}-gpu"


def default_image() -> str:
    return f"ghcr.io/OWNER/ragraph:{project_version()}"


def serve_config(cfg: AppConfig) -> dict[str, Any]:
    """``ragraph serve --export``'s Serve config, as a dict."""
    from serve.launch import export_serve_config

    return yaml.safe_load(export_serve_config(cfg))


def _resources_param(resources: Mapping[str, int]) -> str:
    # KubeRay's convention for the `resources` ray start param: '"{\"Custom1\": 1}"' in YAML.
    return '"' + json.dumps(dict(sorted(resources.items()))).replace('"', '\\"') + '"'


def _container(name: str, image: str, g: NodeGroup, *, ports: list[dict[str, Any]], env: list[dict[str, str]],
               mounts: list[dict[str, str]]) -> dict[str, Any]:
    limits: dict[str, str] = {"cpu": str(g.cpu), "memory": f"{g.memory_gib}Gi"}
    if g.gpus:
        limits[GPU_RESOURCE] = str(g.gpus)
    c: dict[str, Any] = {
        "name": name,
        "image": image,
        "resources": {"requests": dict(limits), "limits": limits},
        "ports": ports,
        "volumeMounts": mounts,
        "securityContext": container_security(read_only=False),
    }
    if env:
        c["env"] = env
    return c


def pod_security() -> dict[str, Any]:
    """Every pod's security context: the image's non-root user ``ray`` (uid 1000, gid 100; the
    ``users`` group may write the volumes) and the container runtime's default seccomp profile."""
    return {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_GID, "fsGroup": RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security(*, read_only: bool) -> dict[str, Any]:
    """Every container's security context (Kubernetes' "restricted" pod security standard): no
    privilege escalation, no capability. ``read_only``: a read-only root filesystem with an emptyDir
    at ``/tmp``; the job containers (the models init container, the re-index CronJob) write only there
    and to their volumes. The Ray containers keep a writable root: Ray (its session under /tmp/ray),
    vLLM, torch and Triton (compile caches under ~/.cache and /tmp) write where it was never listed."""
    return {"allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True, "readOnlyRootFilesystem": read_only}


SCRATCH = {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}}  # /tmp of the read-only containers
SCRATCH_MOUNT = {"name": "scratch", "mountPath": "/tmp"}


def autoscaler_token_volume() -> dict[str, Any]:
    """The head pod's ServiceAccount credentials, as Kubernetes' own auto-mounted volume holds them
    (a bound token, the cluster's CA, the namespace) but mounted into KubeRay's autoscaler sidecar
    only (``autoscalerOptions.volumeMounts``): the pods' ``automountServiceAccountToken`` is false,
    so no Ray or application process holds a Kubernetes credential."""
    return {"name": "autoscaler-token", "projected": {"sources": [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1",
                                                                      "fieldPath": "metadata.namespace"}}]}},
    ]}}


def state_secret(name: str) -> str:
    """The Secret (key ``url``) that holds the whole state database URL, password included, which every
    Ray container gets as ``RAGRAPH__STATE__URL``; created by the operator of the service."""
    return f"{name}-state"


def redis_secret(name: str) -> str:
    """The Secret (key ``password``) that holds the password of the GCS's Redis (:func:`gcs_redis_address`);
    created by the operator of the service."""
    return f"{name}-redis"


def redis_env(name: str) -> dict[str, Any]:
    """``RAGRAPH_REDIS_PASSWORD`` from :func:`redis_secret`: the password the limits and the cache add
    to their Redis URLs (:func:`common.redisurl.with_password`)."""
    return {"name": REDIS_PASSWORD_ENV,
            "valueFrom": {"secretKeyRef": {"name": redis_secret(name), "key": "password"}}}


def state_env(name: str) -> dict[str, Any]:
    """``RAGRAPH__STATE__URL`` from :func:`state_secret`: it replaces ``state.url`` wherever the config is
    loaded in the pod."""
    return {"name": "RAGRAPH__STATE__URL", "valueFrom": {"secretKeyRef": {"name": state_secret(name), "key": "url"}}}


def auth_secret(name: str) -> str:
    """The Secret (key ``auth_token``) that holds the cluster's Ray token; created by the operator of
    the service (``kubectl create secret``), never generated into the manifest."""
    return f"{name}-ray-auth"


def pod_labels(name: str) -> dict[str, str]:
    """The labels of every Ray pod of the RayService ``name`` (the NetworkPolicies select by them)."""
    return {"app.kubernetes.io/name": "ragraph", "app.kubernetes.io/instance": name, "app.kubernetes.io/component": "ray"}


def head_labels(name: str) -> dict[str, str]:
    """The head pod's: its template's labels plus the one KubeRay adds to a head pod."""
    return {**pod_labels(name), "ray.io/node-type": "head"}


def reindex_labels(name: str) -> dict[str, str]:
    """The re-index CronJob's pods: their own component, so no rule for the Ray pods selects them."""
    return {"app.kubernetes.io/name": "ragraph", "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": "reindex"}


def _pod(container: dict[str, Any], volumes: list[dict[str, Any]], *, gpu: bool, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # no Ray process talks to Kubernetes (the autoscaler: its own mount)
        "securityContext": pod_security(),
        "containers": [container],
        "volumes": volumes,
    }
    if gpu:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": pod_labels(name)}, "spec": spec}


def _metadata(name: str, namespace: str | None, *, version: bool = False) -> dict[str, Any]:
    """A manifest's metadata: its name, the namespace when one is given, ragraph's labels."""
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/name": "ragraph"}
    if version:
        meta["labels"]["app.kubernetes.io/version"] = project_version()
    return meta


def rayservice(cfg: AppConfig, *, name: str = "ragraph", namespace: str | None = None,
               image: str | None = None, source: str = "configs/gpu.yaml") -> dict[str, Any]:
    """The ``RayService`` object for ``cfg`` (read by the pods from ``source`` inside the image).
    Raises :class:`KubeRayError` listing every problem."""
    cfg = pod_config(cfg)
    errors = _check_paths(cfg) + _check_state(cfg, name)
    try:
        bounds = group_bounds(cfg)
    except KubeRayError as e:
        errors += [line[4:] for line in str(e).splitlines()[1:]]
    if errors:
        raise KubeRayError(_errors(errors))
    image = image or default_image()
    port = cfg.http.port
    serve_port = {"containerPort": port, "name": "serve"}
    shared = {"name": "shared", "mountPath": str(SHARED_MOUNT)}
    volumes = [{"name": "shared", "persistentVolumeClaim": {"claimName": SHARED_CLAIM}}]
    env: list[dict[str, str]] = []
    if PurePosixPath(cfg.models.dir).is_relative_to(SHARED_MOUNT):
        # Hub models are downloaded once into the shared volume, not once per pod.
        env.append({"name": "HF_HOME", "value": str(PurePosixPath(cfg.models.dir) / "huggingface")})
    # the Ray containers: every ingress replica opens the state database and the Redis of the limits and cache
    ray_env = [*env, state_env(name), redis_env(name)]

    head_container = _container(
        "ray-head", image, HEAD,
        ports=[{"containerPort": GCS_PORT, "name": "gcs-server"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
               {"containerPort": CLIENT_PORT, "name": "client"}, {"containerPort": METRICS_PORT, "name": "metrics"},
               serve_port],
        env=ray_env,
        mounts=[shared],
    )
    head_volumes = volumes + [SCRATCH, autoscaler_token_volume()]
    head_pod = _pod(head_container, head_volumes, gpu=False, name=name)
    head_pod["spec"]["initContainers"] = [models_init_container(cfg, image=image, source=source, env=env)]
    head = {
        "rayStartParams": {
            "num-cpus": str(HEAD.ray_cpus),
            **({"resources": _resources_param(HEAD.resources)} if HEAD.resources else {}),
            # The operator reaches the dashboard through the head Service (the pod's address), so it
            # listens on all of the pod's addresses; the token and the NetworkPolicy guard it.
            "dashboard-host": "0.0.0.0",
        },
        "template": head_pod,
    }
    accel = _accelerators(stage_needs(cfg))
    workers = []
    for g in (CPU_WORKERS, GPU_WORKERS):
        b = bounds[g.name]
        params = {"num-cpus": str(g.ray_cpus)}
        if g.gpus:
            params["num-gpus"] = str(g.gpus)
        custom = {**g.resources, **(accel if g is GPU_WORKERS else {})}
        if custom:
            params["resources"] = _resources_param(custom)
        container = _container("ray-worker", image, g, ports=[serve_port], env=ray_env, mounts=[shared])
        workers.append({
            "groupName": g.name,
            "replicas": b.min_replicas,
            "minReplicas": b.min_replicas,
            "maxReplicas": b.max_replicas,
            "rayStartParams": params,
            "template": _pod(container, volumes, gpu=bool(g.gpus), name=name),
        })
    metadata_ = _metadata(name, namespace, version=True)
    serve_text = yaml.safe_dump(serve_config(cfg), sort_keys=False)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata_,
        "spec": {
            # A new RayCluster per cluster change (KubeRay's default) would double the GPU pods: change
            # the cluster by deleting and re-applying. serveConfigV2 changes are still applied in place.
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": serve_text,
            "rayClusterConfig": {
                "rayVersion": ray_version(),
                "enableInTreeAutoscaling": True,
                # KubeRay's autoscaler sidecar in the head pod: restricted like the Ray containers, and
                # the one container that holds the pod's ServiceAccount token (it patches the RayCluster).
                "autoscalerOptions": {
                    "securityContext": container_security(read_only=False),
                    "volumeMounts": [{"name": "autoscaler-token", "mountPath": SA_TOKEN_DIR, "readOnly": True}],
                },
                # Ray's token authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN from the Secret, set
                # by the operator in every Ray container): without it anyone reaching the head's GCS,
                # dashboard or client port can run code on the cluster.
                "authOptions": {"mode": "token", "secretName": auth_secret(name)},
                # The GCS keeps the cluster's tables in Redis: a head pod that restarts finds the workers,
                # the actors and the Serve application again. KubeRay sets RAY_REDIS_ADDRESS and the
                # password on the head; the tables sit under the RayCluster's UID and go with it.
                "gcsFaultToleranceOptions": {
                    "redisAddress": gcs_redis_address(cfg),
                    "redisPassword": {"valueFrom": {"secretKeyRef": {"name": redis_secret(name), "key": "password"}}},
                },
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }


def models_init_container(cfg: AppConfig, *, image: str, source: str, env: list[dict[str, str]]) -> dict[str, Any]:
    """The head pod's init container: ``ragraph models`` fills ``models.dir`` on the shared volume (hub
    downloads, copies, checksums) before Ray starts, so no engine reaches the hub when Serve starts its
    replicas (workers wait for the head's GCS, the operator for the head, before deploying). Idempotent:
    a restarted head verifies the checksums and downloads nothing."""
    return {
        "name": "models",
        "image": image,
        "command": ["ragraph", "--config", str(APP_DIR / source), "models"],
        **({"env": env} if env else {}),
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
        "volumeMounts": [{"name": "shared", "mountPath": str(SHARED_MOUNT)}, SCRATCH_MOUNT],
        "securityContext": container_security(read_only=True),
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _policy(name: str, namespace: str | None, selector: dict[str, str], *, ingress: list[dict[str, Any]] | None,
            egress: list[dict[str, Any]]) -> dict[str, Any]:
    """A NetworkPolicy for the pods ``selector`` selects; ``ingress`` None: it restricts egress only."""
    spec: dict[str, Any] = {"podSelector": {"matchLabels": selector},
                            "policyTypes": ["Egress"] if ingress is None else ["Ingress", "Egress"]}
    if ingress is not None:
        spec["ingress"] = ingress
    spec["egress"] = egress
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _metadata(name, namespace),
            "spec": spec}


DNS_RULE = {"to": [DNS_PEER], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def config_egress(cfg: AppConfig) -> list[dict[str, Any]]:
    """Egress the config itself needs from the Ray pods beyond the cluster's own: the port of the
    PostgreSQL of ``state.url`` (5432 by default; every ingress replica opens it, and the CLI in the
    pods) and of the Redis of ``governor.rate_limits.storage`` and ``governor.cache.storage``
    (``redis://host:port``, 6379 by default; the ingress replicas, and the GCS through
    :func:`gcs_redis_address`). By port, to any address: the hosts are DNS names, which a
    NetworkPolicy cannot name (narrow the rule with an ``ipBlock`` where the addresses are known)."""
    ports: set[int] = set()
    if cfg.state.url is not None:
        u = urlsplit(cfg.state.url)
        if u.scheme in PG_SCHEMES:
            ports.add(u.port or PG_PORT)
    for storage in (cfg.governor.rate_limits.storage, cfg.governor.cache.storage):
        r = _redis(storage)
        if r is not None:
            ports.add(r.port or REDIS_PORT)
    return [{"ports": _tcp(*sorted(ports))}] if ports else []


def network_policy(cfg: AppConfig, *, name: str = "ragraph", namespace: str | None = None) -> dict[str, Any]:
    """The ``NetworkPolicy`` of the RayService's Ray pods (the head and the workers). In:

    * the Serve port (``http.port``) from anywhere: the ingress controller or load balancer, through
      ``<name>-serve-svc`` (the application checks API keys itself);
    * every port from the Ray pods of the same RayService (a worker's raylet and workers talk to the
      head's GCS, raylet, object manager and worker ports, and the head to theirs);
    * the dashboard port from namespaces labelled ``ragraph.io/ray-operator=true`` (KubeRay's operator
      deploys ``serveConfigV2`` and polls the application there, with the token) and from the re-index
      CronJob's pods (:func:`reindex_labels`: they submit the job there, and reach nothing else);
    * the metrics port from namespaces labelled ``ragraph.io/metrics-scraper=true`` (Prometheus).

    Out: the Ray pods of the same RayService, the cluster DNS, and what the config needs
    (:func:`config_egress`); the head also HTTPS beyond the cluster (:func:`head_egress_policy`).

    Nothing else gets in: the GCS (6379), the dashboard (8265) and the Ray client (10001) are closed to
    every other pod. ``kubectl port-forward`` still reaches the dashboard (it enters through the pod's
    own network namespace). Only enforced where the network plugin implements NetworkPolicy."""
    ray_pods = {"podSelector": {"matchLabels": pod_labels(name)}}
    return _policy(f"{name}-ray-pods", namespace, pod_labels(name), ingress=[
        {"ports": _tcp(cfg.http.port)},
        {"from": [ray_pods]},
        {"from": [{"namespaceSelector": {"matchLabels": dict(OPERATOR_NS_LABEL)}}], "ports": _tcp(DASHBOARD_PORT)},
        {"from": [{"podSelector": {"matchLabels": reindex_labels(name)}}], "ports": _tcp(DASHBOARD_PORT)},
        {"from": [{"namespaceSelector": {"matchLabels": dict(SCRAPER_NS_LABEL)}}], "ports": _tcp(METRICS_PORT)},
    ], egress=[{"to": [ray_pods]}, DNS_RULE, *config_egress(cfg)])


def head_egress_policy(cfg: AppConfig, *, name: str = "ragraph", namespace: str | None = None) -> dict[str, Any]:
    """The head pod's egress beyond the cluster: HTTPS (:data:`API_PORTS`) to any address but the
    link-local ones (the instance metadata service), for the Kubernetes API server (KubeRay's
    autoscaler sidecar) and the model hub (the models init container, when a model comes from it).
    It restricts egress only: what gets in is the Ray pods' policy's."""
    return _policy(f"{name}-head-egress", namespace, head_labels(name), ingress=None, egress=[
        {"to": [{"ipBlock": dict(b)} for b in ANYWHERE], "ports": _tcp(*API_PORTS)},
    ])


def reindex_network_policy(cfg: AppConfig, *, name: str = "ragraph", namespace: str | None = None) -> dict[str, Any]:
    """The re-index CronJob's pods: nothing in; out only the cluster DNS and the head's dashboard port
    (``ray job submit`` to ``<name>-head-svc``)."""
    head = {"podSelector": {"matchLabels": head_labels(name)}}
    return _policy(f"{name}-reindex", namespace, reindex_labels(name), ingress=[], egress=[
        DNS_RULE, {"to": [head], "ports": _tcp(DASHBOARD_PORT)},
    ])


APP_DIR = POD_HOME / "ragraph"  # where the image holds this repository (configs/kuberay/README.md)


def reindex_cronjob(cfg: AppConfig, *, source: str = "configs/gpu.yaml", name: str = "ragraph",
                    namespace: str | None = None, image: str | None = None) -> dict[str, Any] | None:
    """The ``CronJob`` that re-indexes ``indexing.source`` on ``indexing.reindex_schedule`` (None when
    no schedule is set): a small pod that submits ``ragraph index`` to the cluster as a Ray job (the
    driver on a cpu worker, as :data:`INDEX_DRIVER` asks; Ray Data's embedder actors where the config
    puts them) and waits for it. Incremental like any ``ragraph index``: only new or changed chunks
    are embedded, documents uploaded over the API are kept, and the new version goes live with the
    atomic swap. The pod carries its own labels (:func:`reindex_labels`), which the NetworkPolicies let
    reach the head's dashboard (job submission) and nothing else, and the Ray token from the Secret;
    it runs restricted with a read-only root filesystem and no ServiceAccount token."""
    schedule = cfg.indexing.reindex_schedule
    if schedule is None:
        return None
    meta = _metadata(f"{name}-reindex", namespace)
    entry = ["ragraph", "--config", str(APP_DIR / source), "index", str(cfg.indexing.source)]
    submit = ["ray", "job", "submit", "--address", f"http://{name}-head-svc:{DASHBOARD_PORT}",
              "--entrypoint-num-cpus", f"{INDEX_DRIVER['CPU']:g}",
              "--entrypoint-resources", json.dumps({k: v for k, v in INDEX_DRIVER.items() if k != "CPU"}), "--", *entry]
    container = {
        "name": "reindex",
        "image": image or default_image(),
        "command": submit,
        "env": [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": auth_secret(name), "key": "auth_token"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [SCRATCH_MOUNT],
        "securityContext": container_security(read_only=True),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": schedule,
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",  # one re-index at a time (index builds of a root are serialised anyway)
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 1, "template": {
                "metadata": {"labels": reindex_labels(name)},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                         "securityContext": pod_security(), "containers": [container], "volumes": [SCRATCH]},
            }}},
        },
    }


def command(*, source: str, out: str | None = None, name: str = "ragraph", namespace: str | None = None,
            image: str | None = None) -> str:
    """The ``ragraph`` command line that writes this manifest."""
    parts = ["ragraph", "--config", source, "kuberay"]
    for flag, value, default in (("--name", name, "ragraph"), ("--namespace", namespace, None),
                                 ("--image", image, None), ("--out", out, None)):
        if value != default:
            parts += [flag, str(value)]
    return " ".join(parts)


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository when inside it (so the header does not depend on the
    checkout's location), else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks; shared sub-objects written out, not aliased."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, s: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _str)


def render(cfg: AppConfig, *, source: str = "configs/gpu.yaml", name: str = "ragraph", namespace: str | None = None,
           image: str | None = None) -> str:
    """:func:`rayservice` as YAML, under a header naming the command that prints it (the same
    wherever the file is written, so that any copy can be checked) and the sizing."""
    cfg = pod_config(cfg)
    doc = rayservice(cfg, name=name, namespace=namespace, image=image, source=source)
    policy = network_policy(cfg, name=name, namespace=namespace)
    head_out = head_egress_policy(cfg, name=name, namespace=namespace)
    cron = reindex_cronjob(cfg, source=source, name=name, namespace=namespace, image=image)
    docs = [doc, policy, head_out] + ([cron, reindex_network_policy(cfg, name=name, namespace=namespace)] if cron else [])
    bounds = group_bounds(cfg)

    def need(d: Mapping[str, float]) -> str:
        return ", ".join(f"{r} {v:g}" for r, v in d.items() if r in ("CPU", "GPU")) or "nothing"

    lines = [
        f"# Generated by `{command(source=source, name=name, namespace=namespace, image=image)}` "
        f"(--out FILE writes it); do not edit: edit {source} and regenerate.",
        f"# Needs KubeRay >= {KUBERAY_MIN} and the volume claim {SHARED_CLAIM} (ReadWriteMany); the Secrets "
        f"{state_secret(name)} (key url: state.url with its password, as RAGRAPH__STATE__URL)",
        f"# and {redis_secret(name)} (key password: of the Redis at {gcs_redis_address(cfg)}, where the GCS keeps "
        "its tables (gcsFaultToleranceOptions) and the replicas their limits and cache, as RAGRAPH_REDIS_PASSWORD);",
        f"# an image built FROM {base_image()} with this repository installed as '.[gpu]' "
        "(configs/kuberay/README.md).",
        f"# Clients reach the service at {name}-serve-svc:{cfg.http.port}.",
        f"# Models: the head pod's init container runs `ragraph --config {APP_DIR / source} models` into "
        f"{cfg.models.dir} before Ray starts; hub models at the commits the config pins.",
        f"# Ray token authentication: create the Secret {auth_secret(name)} (key auth_token) first; the NetworkPolicy",
        f"# {policy['metadata']['name']} (second document) admits the KubeRay operator's namespace only if it is labelled "
        + ", ".join(f"{k}={v}" for k, v in OPERATOR_NS_LABEL.items()) + " (configs/kuberay/README.md).",
        f"# Pods run as uid {RAY_UID} (non-root, no capability, RuntimeDefault seccomp) without a ServiceAccount token "
        "(only the autoscaler sidecar has one);",
        "# egress: the cluster DNS and this service's pods, TCP "
        + ", ".join(str(p["port"]) for rule in config_egress(cfg) for p in rule["ports"])
        + f" (the state database, Redis), the head HTTPS beyond ({head_out['metadata']['name']}: "
        "the API server, the model hub).",
        "# Worker bounds from the config (cli/kuberay.py group_bounds; pods offer "
        + "; ".join(f"{g.name} {need(g.capacity())}" for g in (CPU_WORKERS, GPU_WORKERS)) + "):",
    ]
    for g, b in bounds.items():
        lines.append(f"#   {g}: min {b.min_replicas} (needs {need(b.min_need)} at min_replicas), "
                     f"max {b.max_replicas} (needs {need(b.max_need)} at max_replicas); {', '.join(b.stages)}")
    if cron is not None:
        lines.append(f"# Scheduled re-index: the CronJob {cron['metadata']['name']} (fourth document, its NetworkPolicy "
                     f"the fifth) submits `ragraph index {cfg.indexing.source}` as a Ray job at "
                     f"'{cron['spec']['schedule']}' UTC.")
    return "\n".join(lines) + "\n" + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100) for d in docs)
