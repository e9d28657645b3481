"""cluster.yaml (the Ray cluster-launcher file for AWS) checked offline, against Ray and against
configs/gpu.yaml.

* Ray's side: the file passes Ray 2.60's own JSON schema (``ray/autoscaler/ray-schema.json``) and
  Ray's offline config preparation (``prepare_config`` + ``validate_config``, what ``ray up`` runs
  before it calls AWS); mutated copies show the same validator rejects a typo or a wrong type.
* ragraph's side: every deployment of configs/gpu.yaml (``serve.graph.deployment_options``,
  computed without starting Ray) is packed onto the node types: custom resources declared, each
  replica or placement bundle fits some node type, the min_replicas fit the min_workers, the index
  job fits beside them. The fit checks are shown to reject impossible configs.
* The command lines in cluster.yaml's comments parse with the real CLIs (ragraph, ``ray job submit``,
  ``ray start``), and the paths gpu.yaml uses are on mounts cluster.yaml makes.
* The state is off the nodes: no head-only volume; every node sources the secrets file (the state
  database's URL with its password, the Redis password) synced from outside the repository before
  ``ray start``, and no password is written in the file; the head's GCS keeps its tables in the Redis
  of gpu.yaml (GCS fault tolerance: ``RAY_REDIS_ADDRESS``).

Nothing here starts Ray or opens a network connection (sockets are blocked for the module).
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import socket
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster.yaml"
GPU_CONFIG = REPO / "configs" / "gpu.yaml"
CONTAINER_REPO = PurePosixPath("/home/ray/ragraph")  # file_mounts' "~/ragraph" inside the container

# What AWS autodetection fills in for the instance types cluster.yaml uses (vCPUs, NVIDIA GPUs and
# Ray's accelerator_type resource); a node type's declared resources win over it, as in Ray's
# AWSNodeProvider.fillout_available_node_types_resources. A new instance type needs a row here.
INSTANCE_TYPES: dict[str, dict[str, float]] = {
    "m6i.2xlarge": {"CPU": 8},  # 32 GiB
    "m6i.4xlarge": {"CPU": 16},  # 64 GiB
    "g6.4xlarge": {"CPU": 16, "GPU": 1, "accelerator_type:L4": 1},  # 1x L4 24 GB, 64 GiB
}
NODE_TYPES = {"head", "cpu", "gpu"}  # names other code and docs use
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}
EPS = 1e-9


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Any TCP/UDP connection attempt fails the test: nothing here may reach AWS or a hub."""
    real_connect = socket.socket.connect

    def guarded(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"test_cluster_files must stay offline; something connected to {address!r}")
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded)
        yield


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def schema_validator():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)  # the draft the schema declares ($schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def gpu_cfg():
    from common.config import load_config

    return load_config(GPU_CONFIG, environ={})


@pytest.fixture(scope="module")
def options(gpu_cfg) -> dict[str, dict[str, Any]]:
    import ray

    from serve.graph import deployment_options

    opts = deployment_options(gpu_cfg)
    assert not ray.is_initialized(), "computing the deployment options started Ray"
    return opts


@pytest.fixture(scope="module")
def job() -> "JobSubmit":
    return documented_job_submit()


# ---------------------------------------------------------------------------------------------
# helpers: resources, node capacities, packing


@dataclass(frozen=True)
class Demand:
    label: str  # e.g. "generator replica 1, bundle 0"
    resources: dict[str, float]


def node_capacity(name: str, node_type: dict[str, Any]) -> dict[str, float]:
    """What one node of this type offers Ray: the instance's hardware, overridden by the declared
    ``resources`` (declared values win, as with AWS autodetection)."""
    instance = node_type["node_config"]["InstanceType"]
    if instance not in INSTANCE_TYPES:
        raise AssertionError(
            f"node type {name!r} uses {instance}, which INSTANCE_TYPES does not list; known: {sorted(INSTANCE_TYPES)}. "
            "Add its vCPUs and GPUs there."
        )
    return {k: float(v) for k, v in {**INSTANCE_TYPES[instance], **node_type["resources"]}.items()}


def capacities(cluster: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {name: node_capacity(name, t) for name, t in cluster["available_node_types"].items()}


def _clean(resources: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


def actor_demand(actor_options: dict[str, Any]) -> dict[str, float]:
    """One actor's resource request from Serve's ``ray_actor_options`` (Ray's defaults: 1 CPU, 0 GPU;
    ``accelerator_type`` becomes the ``accelerator_type:<name>`` resource, as Ray does)."""
    d: dict[str, Any] = {"CPU": actor_options.get("num_cpus", 1), "GPU": actor_options.get("num_gpus", 0)}
    d.update(actor_options.get("resources") or {})
    if actor_options.get("accelerator_type"):
        d[f"accelerator_type:{actor_options['accelerator_type']}"] = 0.001
    return _clean(d)


def replica_demands(name: str, opts: dict[str, Any], copy_no: int = 1) -> list[Demand]:
    """One replica's requests: its placement-group bundles (the replica actor lives in bundle 0),
    or, without a placement group, its actor. STRICT_PACK bundles must share one node, so they
    count as one request; PACK and SPREAD may split over nodes."""
    bundles = opts.get("placement_group_bundles")
    if not bundles:
        return [Demand(f"{name} replica {copy_no}", actor_demand(opts.get("ray_actor_options") or {}))]
    cleaned = [_clean(b) for b in bundles]
    if opts.get("placement_group_strategy") == "STRICT_PACK":
        merged: dict[str, float] = {}
        for b in cleaned:
            for k, v in b.items():
                merged[k] = merged.get(k, 0) + v
        return [Demand(f"{name} replica {copy_no}, all {len(cleaned)} bundles (STRICT_PACK)", merged)]
    return [Demand(f"{name} replica {copy_no}, bundle {i}", b) for i, b in enumerate(cleaned)]


def deployment_demands(options: dict[str, dict[str, Any]], *, bound: str) -> list[Demand]:
    """Every replica's requests with each deployment at its ``min_replicas`` or ``max_replicas``."""
    out = []
    for name, opts in options.items():
        n = opts["autoscaling_config"][bound] if "autoscaling_config" in opts else opts.get("num_replicas", 1)
        for i in range(1, n + 1):
            out.extend(replica_demands(name, opts, i))
    return out


def fits(demand: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(capacity.get(k, 0) + EPS >= v for k, v in demand.items())


def fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def cluster_nodes(cluster: dict[str, Any], counts: dict[str, int]) -> list[tuple[str, dict[str, float]]]:
    """The nodes of a cluster with ``counts[type]`` nodes of each type (the head always once)."""
    caps = capacities(cluster)
    nodes = [(f"{cluster['head_node_type']} #1", caps[cluster["head_node_type"]])]
    for name in caps:
        if name != cluster["head_node_type"]:
            nodes += [(f"{name} #{i}", caps[name]) for i in range(1, counts.get(name, 0) + 1)]
    return nodes


def worker_counts(cluster: dict[str, Any], key: str, **override: str) -> dict[str, int]:
    """``min_workers`` or ``max_workers`` of each type; ``override`` picks another key per type."""
    return {n: t.get(override.get(n, key), 0) for n, t in cluster["available_node_types"].items()}


def pack(demands: list[Demand], nodes: list[tuple[str, dict[str, float]]]) -> list[str]:
    """First-fit decreasing: GPU demands first, then those with custom resources, then by CPU; each
    on the first node (head, then workers in type order) with room. Returns what did not fit, one
    line each. A heuristic that never over-packs: a failure may be pessimistic, a pass is a real
    placement (listed by the assertion messages on failure)."""
    free = [(label, dict(cap)) for label, cap in nodes]
    order = sorted(
        demands,
        key=lambda d: (d.resources.get("GPU", 0), len(set(d.resources) - BUILTIN), d.resources.get("CPU", 0)),
        reverse=True,
    )
    unplaced = []
    for d in order:
        for _, room in free:
            if fits(d.resources, room):
                for k, v in d.resources.items():
                    room[k] -= v
                break
        else:
            unplaced.append(f"{d.label} {fmt(d.resources)}")
    if unplaced:
        left = "; ".join(f"{label}: {fmt({k: v for k, v in room.items() if v > EPS})}" for label, room in free)
        unplaced.append(f"(room left after packing: {left})")
    return unplaced


# ---------------------------------------------------------------------------------------------
# the checks (each returns a list of problems; the tests assert it is empty, or, on a broken
# config, that it names the culprit)


def undeclared_resources(options: dict[str, dict[str, Any]], cluster: dict[str, Any]) -> list[str]:
    """Custom resources a deployment asks for that no node type declares: such a replica would
    stay pending forever, and the autoscaler would never know which node type to add."""
    declared = {k for t in cluster["available_node_types"].values() for k in t["resources"]}
    problems = []
    for name, opts in options.items():
        for d in replica_demands(name, opts):
            for res in sorted(set(d.resources) - BUILTIN - declared):
                problems.append(f"{d.label} asks for {res!r}; cluster.yaml declares {sorted(declared)}")
    return problems


def unplaceable_replicas(options: dict[str, dict[str, Any]], cluster: dict[str, Any]) -> list[str]:
    """Replicas (or placement bundles) that fit no node type even on an empty node."""
    caps = capacities(cluster)
    return [
        f"{d.label} {fmt(d.resources)} fits no node type: "
        + "; ".join(f"{n} {fmt(c)}" for n, c in caps.items())
        for name, opts in options.items()
        for d in replica_demands(name, opts)
        if not any(fits(d.resources, c) for c in caps.values())
    ]


def min_cluster_shortfall(options: dict[str, dict[str, Any]], cluster: dict[str, Any]) -> list[str]:
    """What of the min_replicas does not pack into head + the min_workers of every type."""
    return pack(deployment_demands(options, bound="min_replicas"), cluster_nodes(cluster, worker_counts(cluster, "min_workers")))


def index_job_demands(cfg, job: "JobSubmit") -> list[Demand]:
    """The index job: its driver (the documented ``ray job submit`` resources) and the Ray Data
    embedder actors (``indexing.concurrency`` of them, as indexing.embedding.embed_with_ray asks)."""
    ix = cfg.indexing
    gpus = ix.gpus_per_actor if cfg.embedder.device == "cuda" else 0
    actor = _clean({"CPU": ix.threads_per_actor, "GPU": gpus})
    return [Demand("index job driver", job.driver_resources)] + [
        Demand(f"embedder actor {i}", actor) for i in range(1, ix.concurrency + 1)
    ]


def index_job_shortfall(cfg, options, cluster, job) -> list[str]:
    """The index job runs while the service serves: min_replicas + driver + embedder actors on
    head + the cpu type's min_workers + every other worker type at its max_workers (the autoscaler
    adds gpu nodes for the actors)."""
    counts = worker_counts(cluster, "max_workers", cpu="min_workers")
    demands = deployment_demands(options, bound="min_replicas") + index_job_demands(cfg, job)
    return pack(demands, cluster_nodes(cluster, counts))


# ---------------------------------------------------------------------------------------------
# the commands documented in cluster.yaml's comments


def comment_text() -> str:
    return "\n".join(line.split("#", 1)[1] for line in CLUSTER.read_text().splitlines() if line.lstrip().startswith("#"))


def documented_ragraph_commands() -> list[str]:
    """Every ``ragraph --config ...`` invocation in the comments, up to the closing quote or ``&&``."""
    return [m.strip() for m in re.findall(r"\bragraph (--config [^'&\n]+)", comment_text())]


@dataclass(frozen=True)
class JobSubmit:
    params: dict[str, Any]  # click's parsed parameters of `ray job submit`
    driver_resources: dict[str, float]


def documented_job_submit() -> JobSubmit:
    """The ``ray job submit`` line, parsed by Ray's own click command (parsing only, nothing runs)."""
    from ray.dashboard.modules.job.cli import job_cli_group

    lines = [line.strip() for line in comment_text().splitlines() if "ray job submit" in line]
    assert len(lines) == 1, f"expected one `ray job submit` line in cluster.yaml's comments, found {lines}"
    argv = shlex.split(lines[0].split("ray job submit", 1)[1])
    params = job_cli_group.commands["submit"].make_context("submit", argv).params
    resources = json.loads(params["entrypoint_resources"] or "{}")
    driver = _clean({"CPU": params["entrypoint_num_cpus"] or 0, "GPU": params["entrypoint_num_gpus"] or 0, **resources})
    return JobSubmit(params=params, driver_resources=driver)


def parse_ragraph(argv: list[str]):
    from cli.main import build_parser

    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`ragraph {shlex.join(argv)}` from cluster.yaml does not parse with ragraph's CLI (see stderr)")


def repo_path(path: str) -> Path:
    """A path as a documented command gives it: relative to ~/ragraph (the commands cd there) or
    absolute inside the container's checkout."""
    p = PurePosixPath(path)
    if p.is_absolute():
        assert p.is_relative_to(CONTAINER_REPO), f"{path} is outside the synced checkout {CONTAINER_REPO}"
        return REPO / p.relative_to(CONTAINER_REPO)
    return REPO / p


def volume_mounts(options: list[str]) -> dict[PurePosixPath, PurePosixPath]:
    """``-v HOST:CONTAINER`` docker options -> {container path: host path}."""
    out = {}
    for opt in options:
        parts = shlex.split(opt)
        if parts[0] in ("-v", "--volume"):
            host, container = parts[1].split(":")[:2]
            out[PurePosixPath(container)] = PurePosixPath(host)
    return out


def under_any(path: Path | PurePosixPath, roots) -> bool:
    return any(PurePosixPath(path).is_relative_to(r) for r in roots)


# ---------------------------------------------------------------------------------------------
# Ray's schema and config preparation


def test_ray_schema_accepts_cluster_yaml(cluster, schema_validator):
    errors = sorted(schema_validator.iter_errors(cluster), key=lambda e: list(e.absolute_path))
    assert not errors, f"{len(errors)} schema error(s) in {CLUSTER.name}:\n" + "\n".join(
        f"  {'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message}" for e in errors
    )


def test_ray_prepares_and_validates_cluster_yaml_offline(cluster):
    """What `ray up` does before it talks to AWS: merge with the AWS defaults, merge the setup
    commands, check docker, fill min/max workers, then validate_config (schema + head type + sum of
    min_workers <= max_workers). Our values must survive the merge unchanged."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["available_node_types"] == cluster["available_node_types"]
    assert prepared["head_setup_commands"] == cluster["setup_commands"] + cluster["head_setup_commands"]
    assert prepared["worker_setup_commands"] == cluster["setup_commands"] + cluster["worker_setup_commands"]
    assert prepared["docker"]["image"] == cluster["docker"]["image"]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return mutate


def _rename(path: str, new: str) -> Callable[[dict], None]:
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)
    return mutate


SCHEMA_BREAKERS = {
    "typo min_worker": _rename("available_node_types.gpu.min_workers", "min_worker"),
    "typo run_option": _rename("docker.run_options", "run_option"),
    "unknown top-level key": _rename("head_start_ray_commands", "head_start_commands"),
    "max_workers as a string": _set("max_workers", "ten"),
    "fractional resource": _set("available_node_types.head.resources", {"CPU": 3.5}),
    "node type without resources": lambda c: c["available_node_types"]["cpu"].pop("resources"),
}


@pytest.mark.parametrize("breaker", SCHEMA_BREAKERS.values(), ids=SCHEMA_BREAKERS.keys())
def test_schema_rejects_broken_copies(cluster, schema_validator, breaker):
    """The same validator bites: a typo'd key or a wrong type is an error, both through the
    schema and through Ray's own prepare + validate path."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    breaker(bad)
    assert list(schema_validator.iter_errors(bad)), "the schema accepted a broken config"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize(
    "breaker, message",
    [
        (_set("head_node_type", "ray.head.default"), "head_node_type"),
        (_set("max_workers", 2), "sum of `min_workers`"),
    ],
    ids=["unknown head type", "max_workers below the min_workers"],
)
def test_ray_validate_rejects_inconsistent_copies(cluster, breaker, message):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    breaker(bad)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_config(prepare_config(bad))


# ---------------------------------------------------------------------------------------------
# the node types


def test_node_types_and_nothing_pinned_to_the_head(cluster, options):
    """No stage runs on the head any more (the governor deployment, pinned there by `ragraph_head`, is
    gone): the head declares no custom resource, and every stage asks for one a worker type offers or
    for GPUs. Fails on the file before (the head declared ragraph_head)."""
    types = cluster["available_node_types"]
    assert set(types) == NODE_TYPES, f"node types are {sorted(types)}; other code and docs use {sorted(NODE_TYPES)}"
    assert cluster["head_node_type"] == "head"
    assert types["head"]["resources"] == {"CPU": 4} and types["head"].get("max_workers", 0) == 0
    assert not any("ragraph_head" in t["resources"] for t in types.values())
    head = node_capacity("head", types["head"])
    for name, opts in options.items():
        for d in replica_demands(name, opts):
            assert not fits(d.resources, head), f"{d.label} {fmt(d.resources)} could land on the head {fmt(head)}"
    assert cluster["max_workers"] >= sum(t.get("max_workers", 0) for t in types.values()), (
        "the global max_workers would cap the per-type max_workers"
    )


def test_declared_resources_match_the_hardware(cluster):
    """Declaring more CPUs or GPUs than the instance has would make Ray oversubscribe it."""
    problems = []
    for name, t in cluster["available_node_types"].items():
        node_capacity(name, t)  # an unknown instance type fails here, with the remedy
        hw = INSTANCE_TYPES[t["node_config"]["InstanceType"]]
        for res in ("CPU", "GPU"):
            if res in t["resources"] and t["resources"][res] > hw.get(res, 0):
                problems.append(f"{name}: declares {res}={t['resources'][res]}, {t['node_config']['InstanceType']} has {hw.get(res, 0)}")
        for res in t["resources"]:
            if res.startswith("accelerator_type:") and hw.get(res) != 1:
                problems.append(f"{name}: declares {res!r}, but {t['node_config']['InstanceType']} has {hw}")
    assert not problems, "\n".join(problems)


def test_gpus_flag_only_on_gpu_nodes(cluster):
    """`--gpus all` makes docker fail on a host without NVIDIA GPUs: it belongs to GPU types only."""
    d = cluster["docker"]
    for key in ("run_options", "head_run_options", "worker_run_options"):
        assert not any("--gpus" in o for o in d.get(key, [])), f"docker.{key} has --gpus; it also applies to CPU-only nodes"
    for name, t in cluster["available_node_types"].items():
        has_gpu = node_capacity(name, t).get("GPU", 0) > 0
        flagged = any("--gpus" in o for o in t.get("docker", {}).get("worker_run_options", []))
        assert flagged == has_gpu, f"node type {name!r}: GPU={has_gpu} but --gpus in its worker_run_options={flagged}"


def test_image_matches_the_pinned_ray_and_python(cluster):
    import ray

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["optional-dependencies"]["stack"] if d.startswith("ray[")]
    assert pins == [f"ray[serve,data]=={ray.__version__}"], f"pyproject pins {pins}, this venv has ray {ray.__version__}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    for key in ("image", "head_image", "worker_image"):
        if key in cluster["docker"]:
            assert cluster["docker"][key] == f"rayproject/ray:{ray.__version__}-{py}-gpu", cluster["docker"][key]


def test_repo_sync_and_install(cluster):
    assert cluster["file_mounts"]["~/ragraph"] == "."
    # the repo, the Ray token's folder, the secrets' folder (FILL IN 4)
    assert set(cluster["file_mounts"]) == {"~/ragraph", "~/ray-auth", "~/ragraph-secrets"}
    assert cluster["file_mounts_sync_continuously"] is False
    excluded = set(cluster["rsync_exclude"])
    assert {".venv", ".git", "__pycache__", "*.pyc", "load_tests/results"} <= excluded, excluded
    assert "cd ~/ragraph && pip install -e '.[gpu]'" in cluster["setup_commands"]
    gpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(d.startswith("vllm==") for d in gpu_extra) and any(d.startswith("faiss-gpu==") for d in gpu_extra)


def test_ray_start_commands_parse(cluster):
    """The start commands use real `ray start` options (parsed by Ray's click command; nothing runs)."""
    from ray.scripts.scripts import start

    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        cmds = cluster[key]
        assert cmds[0] == "ray stop"
        _, argv = start_parts(cmds[-1])[-1]
        assert argv[:2] == ["ray", "start"], cmds[-1]
        params = start.make_context("start", argv[2:]).params
        assert params["head"] is head and params["object_manager_port"] == 8076
        if head:
            assert params["port"] == 6379 and params["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
        else:
            assert params["address"] == "$RAY_HEAD_IP:6379"


def test_gpu_config_paths_are_on_mounts(cluster, gpu_cfg):
    """Paths every node shares (models, indexes, corpus, the upload spool) are on a volume every
    container mounts; the state is in PostgreSQL (state.url), so no node keeps any: no head-only volume
    (the file before bind-mounted the governor's SQLite file onto the head's disk)."""
    shared = volume_mounts(cluster["docker"]["run_options"])
    assert shared, "docker.run_options mounts no shared volume"
    for what, path in [("models.dir", gpu_cfg.models.dir), ("indexing.dir", gpu_cfg.indexing.dir),
                       ("indexing.source", gpu_cfg.indexing.source), ("documents.spool_dir", gpu_cfg.documents.spool_dir)]:
        assert path is not None and under_any(path, shared), (
            f"gpu.yaml {what}={path} is on no volume every node mounts ({sorted(map(str, shared))})")
    assert gpu_cfg.state.url and gpu_cfg.state.url.startswith("postgresql"), gpu_cfg.state.url
    assert volume_mounts(cluster["docker"].get("head_run_options", [])) == {}, "a head-only volume: state on the head"
    init = " ".join(cluster["initialization_commands"])
    for container, host in shared.items():
        assert f" {host})" in init or f" {host} " in init, f"no initialization command mounts {host} (for {container})"
    assert "ragraph-state" not in CLUSTER.read_text()


def test_documented_ragraph_commands_parse(gpu_cfg):
    """`--config` is a global option (before the subcommand); a misplaced or unknown flag fails here."""
    cmds = [shlex.split(c) for c in documented_ragraph_commands()]
    for argv in cmds:
        args = parse_ragraph(argv)
        assert repo_path(str(args.config)).is_file(), f"`ragraph {shlex.join(argv)}`: {args.config} is not in the repo"
    assert {"serve", "index", "keys"} <= {argv[2] for argv in cmds}, cmds
    index = [argv for argv in cmds if argv[2] == "index"]
    assert index and all(PurePosixPath(a[-1]) == PurePosixPath(gpu_cfg.indexing.source) for a in index), index


def test_documented_job_submit(cluster, job):
    """The index job's driver asks for a resource only a worker type offers (never the head), and
    its entrypoint is a ragraph command that parses."""
    custom = set(job.driver_resources) - BUILTIN
    assert custom, "the index job asks for no custom resource: its driver could land on the head"
    head = cluster["available_node_types"][cluster["head_node_type"]]["resources"]
    assert not custom & set(head), f"the head declares {custom & set(head)}: the driver could run there"
    caps = capacities(cluster)
    assert any(fits(job.driver_resources, c) for n, c in caps.items() if n != cluster["head_node_type"])
    entry = list(job.params["entrypoint"])
    assert entry[0] == "ragraph", entry
    args = parse_ragraph(entry[1:])
    assert PurePosixPath(args.config).is_absolute(), f"{args.config}: the job's working directory is not ~/ragraph"
    assert repo_path(str(args.config)).is_file(), args.config


# ---------------------------------------------------------------------------------------------
# Ray's token authentication (RAY_AUTH_MODE=token) on every node; the dashboard on loopback


def docker_env(options: list[str]) -> dict[str, str]:
    """``--env K=V`` / ``-e K=V`` docker options -> {K: V}."""
    out = {}
    for opt in options:
        parts = shlex.split(opt)
        for flag, value in zip(parts, parts[1:]):
            if flag in ("-e", "--env") and "=" in value:
                k, v = value.split("=", 1)
                out[k] = v
    return out


def container_path(path: str) -> PurePosixPath:
    """A file_mounts destination as the container sees it (the image's user `ray`, home /home/ray)."""
    return PurePosixPath(path.replace("~/", "/home/ray/", 1) if path.startswith("~/") else path)


def _strings(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [s for k, v in tree.items() for s in _strings(k) + _strings(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _strings(v)]
    return [tree] if isinstance(tree, str) else []


def start_parts(cmd: str) -> list[tuple[dict[str, str], list[str]]]:
    """The ``;``-separated parts of a start command: each part's leading ``VAR=value`` assignments (the
    environment of that one command) and the rest of its argv."""
    out = []
    for part in cmd.split(";"):
        argv = shlex.split(part)
        env = {}
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            k, v = argv.pop(0).split("=", 1)
            env[k] = v
        out.append((env, argv))
    return out


def auth_problems(cluster: dict[str, Any]) -> list[str]:
    """Why Ray's token authentication would not be on for every node and every process, or the
    dashboard (job submission) would listen beyond the head's loopback."""
    from ray.scripts.scripts import start

    problems = []
    docker = cluster.get("docker", {})
    env = docker_env(docker.get("run_options", []))
    if env.get("RAY_AUTH_MODE") != "token":
        problems.append(f"docker.run_options (every node) sets RAY_AUTH_MODE={env.get('RAY_AUTH_MODE')!r}, not 'token'")
    for text in _strings(cluster):
        for mode in re.findall(r"RAY_AUTH_MODE=(\w+)", text):
            if mode != "token":
                problems.append(f"RAY_AUTH_MODE={mode} in {text!r}")
        if re.search(r"RAY_AUTH_TOKEN=\S", text):
            problems.append(f"a token written into the file: {text!r}")
    token_file = env.get("RAY_AUTH_TOKEN_PATH")
    mounts = {container_path(remote): local for remote, local in cluster.get("file_mounts", {}).items()}
    if not token_file:
        problems.append("no RAY_AUTH_TOKEN_PATH in docker.run_options: the nodes have no token")
    elif not any(PurePosixPath(token_file).parent == m for m in mounts):
        problems.append(f"RAY_AUTH_TOKEN_PATH={token_file} is in no file_mounts folder ({sorted(map(str, mounts))})")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for cmd in cluster.get(key, []):
            for part, (_, argv) in zip(cmd.split(";"), start_parts(cmd)):
                if "RAY_AUTH_MODE" in part and not re.search(r"RAY_AUTH_MODE=token\b", part):
                    problems.append(f"{key}: {part.strip()!r} changes RAY_AUTH_MODE")
                if argv[:2] != ["ray", "start"]:
                    continue
                params = start.make_context("start", argv[2:]).params
                if params["head"] and params["dashboard_host"] not in ("127.0.0.1", "localhost"):
                    problems.append(f"{key}: the dashboard listens on {params['dashboard_host']}, not the head's loopback")
    return problems


def test_token_auth_on_every_node_and_the_dashboard_on_loopback(cluster):
    assert auth_problems(cluster) == []
    # the token file sits in a folder synced from this machine, the path the comments tell to create
    mounts = {container_path(r): l for r, l in cluster["file_mounts"].items()}
    token = PurePosixPath(docker_env(cluster["docker"]["run_options"])["RAY_AUTH_TOKEN_PATH"])
    local = f"{mounts[token.parent]}/{token.name}"
    assert f"> {local})" in comment_text(), f"the FILL IN step does not create {local}"


@pytest.mark.parametrize("breaker, problem", [
    (_set("head_start_ray_commands", [
        "ray stop", "ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
        "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0"]), "the dashboard listens on 0.0.0.0"),
    (lambda c: c["docker"].update(run_options=[o for o in c["docker"]["run_options"] if "RAY_AUTH" not in o]),
     "not 'token'"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(-1, "RAY_AUTH_MODE=disabled " + c["worker_start_ray_commands"][-1]),
     "RAY_AUTH_MODE=disabled"),
    (lambda c: c["file_mounts"].pop("~/ray-auth"), "in no file_mounts folder"),
    (lambda c: c["docker"]["run_options"].append("--env RAY_AUTH_TOKEN=abc123"), "a token written into the file"),
], ids=["dashboard on 0.0.0.0 (the old file)", "no RAY_AUTH_MODE (the old file)", "auth forced off on workers",
        "token file not mounted", "literal token"])
def test_auth_check_rejects_the_old_and_broken_copies(cluster, breaker, problem):
    bad = copy.deepcopy(cluster)
    breaker(bad)
    found = auth_problems(bad)
    assert any(problem in p for p in found), found


def test_the_documented_client_sends_the_clusters_token(cluster):
    """The `ray job submit` recipe runs with RAY_AUTH_MODE=token and the token file that is synced to
    the nodes: an explicit --address never turns token auth on by itself (Ray only does that for a
    local ray.init() or address 'auto')."""
    mounts = {container_path(r): l for r, l in cluster["file_mounts"].items()}
    token = PurePosixPath(docker_env(cluster["docker"]["run_options"])["RAY_AUTH_TOKEN_PATH"])
    exports = [shlex.split(line.strip()) for line in comment_text().splitlines() if line.strip().startswith("export ")]
    env = dict(a.split("=", 1) for argv in exports for a in argv[1:])
    assert env.get("RAY_AUTH_MODE") == "token", exports
    assert env.get("RAY_AUTH_TOKEN_PATH") == f"{mounts[token.parent]}/{token.name}", exports
    text = comment_text()
    assert text.index("export RAY_AUTH_MODE=token") < text.index("ray job submit")


# ---------------------------------------------------------------------------------------------
# the state off the nodes: the secrets file sourced before `ray start`, GCS fault tolerance in Redis

# scheme://user:password@host: a password written into a URL
PASSWORD_URL = re.compile(r"[a-z+]+://[^\s/@:']*:[^\s/@']+@")
PLACEHOLDER = "PASSWORD"  # what the FILL IN comment writes where the real password goes


def state_problems(cluster: dict[str, Any], cfg) -> list[str]:
    """Why the nodes would not get the state database's URL and the Redis password from the synced
    secrets file, a password would be written into the file, or the head's GCS would not keep its
    tables in gpu.yaml's Redis (``cli.kuberay.gcs_redis_address``: the same rule as the KubeRay manifest)."""
    from cli.kuberay import gcs_redis_address

    problems = []
    mounts = {container_path(r): l for r, l in cluster.get("file_mounts", {}).items()}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        parts = start_parts((cluster.get(key) or [""])[-1])
        starts = [i for i, (_, argv) in enumerate(parts) if argv[:2] == ["ray", "start"]]
        if not starts:
            problems.append(f"{key}: no `ray start`")
            continue
        before = [argv for _, argv in parts[:starts[0]]]
        at = [i for i, argv in enumerate(before) if argv[:1] in (["."], ["source"]) and len(argv) > 1]
        sourced = [before[i][1] for i in at]
        if not at or ["set", "-a"] not in before[:at[0]]:
            problems.append(f"{key}: does not source the secrets file with `set -a` before `ray start`")
        for f in sourced:
            folder = container_path(f).parent
            if folder not in mounts:
                problems.append(f"{key}: {f} is in no file_mounts folder ({sorted(map(str, mounts))})")
            elif not str(mounts[folder]).startswith("~/") or str(mounts[folder]).startswith("~/ragraph"):
                problems.append(f"{key}: {f} is synced from {mounts[folder]}, not from outside the repository")
        env, argv = parts[starts[0]]
        if key == "head_start_ray_commands":
            want = gcs_redis_address(cfg)
            if env.get("RAY_REDIS_ADDRESS") != want:
                problems.append(f"{key}: RAY_REDIS_ADDRESS={env.get('RAY_REDIS_ADDRESS')!r}, not gpu.yaml's Redis {want!r}")
            if not env.get("RAY_external_storage_namespace"):
                problems.append(f"{key}: no RAY_external_storage_namespace (a restarted head must find its tables)")
            from ray.scripts.scripts import start

            password = start.make_context("start", argv[2:]).params["redis_password"]
            if not password.startswith("$"):
                problems.append(f"{key}: --redis-password is a literal, not the secrets file's variable")
    for text in _strings(cluster):
        if PASSWORD_URL.search(text):
            problems.append(f"a password written into the file: {text!r}")
        if re.search(r"RAGRAPH__STATE__URL=\S", text):
            problems.append(f"the state URL written into the file: {text!r}")
    if volume_mounts(cluster.get("docker", {}).get("head_run_options", [])):
        problems.append("docker.head_run_options mounts a head-only volume: state on the head")
    return problems


def test_state_url_and_redis_password_come_from_the_synced_secrets_file(cluster, gpu_cfg):
    """Head and workers source ~/ragraph-secrets/ragraph.env (synced from ~/.ragraph/secrets, outside
    the repository) with `set -a` before `ray start`, so every Ray process, the ingress replicas
    included, has RAGRAPH__STATE__URL; the head's GCS writes to gpu.yaml's Redis; no password is in the
    file; the FILL IN step shows the URL of gpu.yaml's state.url with a placeholder password."""
    from urllib.parse import urlsplit

    from ray._private.services import get_address

    assert state_problems(cluster, gpu_cfg) == []
    env, _ = start_parts(cluster["head_start_ray_commands"][-1])[-1]
    limits = urlsplit(gpu_cfg.governor.rate_limits.storage)
    assert get_address(env["RAY_REDIS_ADDRESS"]) == (limits.hostname, str(limits.port or 6379), False)
    worker_env, _ = start_parts(cluster["worker_start_ray_commands"][-1])[-1]
    assert int(worker_env["RAY_gcs_rpc_server_reconnect_timeout_s"]) >= 300  # workers outlive a head restart
    documented = [line.split("=", 1)[1].strip("'") for line in comment_text().split()
                  if line.startswith("RAGRAPH__STATE__URL=")]
    assert len(documented) == 1, documented
    doc, state = urlsplit(documented[0]), urlsplit(gpu_cfg.state.url)
    assert doc.password == PLACEHOLDER and (doc.scheme, doc.hostname, doc.port, doc.path, doc.username) == (
        state.scheme, state.hostname, state.port, state.path, state.username)
    assert state.password is None  # gpu.yaml holds no password either
    (secrets,) = {container_path(argv[1]) for key in ("head_start_ray_commands", "worker_start_ray_commands")
                  for _, argv in start_parts(cluster[key][-1]) if argv[:1] == ["."]}
    local = cluster["file_mounts"][f"~/{secrets.parent.relative_to('/home/ray')}"]
    assert f"~/.ragraph/secrets/{secrets.name}" == f"{local}/{secrets.name}" and f"{local}/{secrets.name}" in comment_text()


OLD_HEAD_START = ("ulimit -n 65536; ray start --head --port=6379 --object-manager-port=8076 "
                  "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1")


@pytest.mark.parametrize("breaker, problem", [
    (lambda c: c["head_start_ray_commands"].__setitem__(-1, OLD_HEAD_START), "does not source the secrets file"),
    (lambda c: c["head_start_ray_commands"].__setitem__(-1, OLD_HEAD_START), "RAY_REDIS_ADDRESS=None"),
    (lambda c: c["worker_start_ray_commands"].__setitem__(
        -1, "ulimit -n 65536; ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076"), "does not source"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("ragraph-redis.internal:6379", "localhost:6379")), "not gpu.yaml's Redis"),
    (lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace('"$REDIS_PASSWORD"', "hunter2")), "--redis-password is a literal"),
    (lambda c: c["file_mounts"].pop("~/ragraph-secrets"), "in no file_mounts folder"),
    (lambda c: c["file_mounts"].__setitem__("~/ragraph-secrets", "~/ragraph/secrets"), "not from outside the repository"),
    (lambda c: c["docker"]["run_options"].append(
        "--env RAGRAPH__STATE__URL=postgresql+psycopg://ragraph:hunter2@db.internal:5432/ragraph"), "a password written"),
    (lambda c: c["docker"].update(head_run_options=["-v /home/ubuntu/ragraph-state:/home/ray/ragraph-state"]),
     "head-only volume"),
], ids=["the old head start (no secrets)", "the old head start (no GCS FT)", "worker without the secrets",
        "another Redis", "literal Redis password", "secrets not synced", "secrets synced from the repo",
        "literal state URL", "the old state volume"])
def test_state_check_rejects_the_old_and_broken_copies(cluster, gpu_cfg, breaker, problem):
    bad = copy.deepcopy(cluster)
    breaker(bad)
    found = state_problems(bad, gpu_cfg)
    assert any(problem in p for p in found), found


# ---------------------------------------------------------------------------------------------
# the local launchers leave RAY_AUTH_MODE to the user

LAUNCHERS = ["serve.launch.start_ray", "indexing.embedding.ensure_ray"]


def _launch(target: str, address: str | None) -> None:
    if target == "serve.launch.start_ray":
        from common.config import load_config
        from serve.launch import start_ray

        start_ray(load_config(GPU_CONFIG, environ={}), address=address)
    else:
        from indexing.embedding import ensure_ray

        ensure_ray(address)


@pytest.mark.parametrize("target", LAUNCHERS)
@pytest.mark.parametrize("address", [None, "10.0.0.5:6379"], ids=["local head", "existing cluster"])
@pytest.mark.parametrize("mode", [None, "token", "disabled"], ids=["unset", "token", "disabled"])
def test_launchers_never_set_ray_auth_mode(monkeypatch, target, address, mode):
    """ray.init sees RAY_AUTH_MODE exactly as the user left it: unset stays unset (Ray then turns
    token auth on for a local head, and a cluster's token is required), a set value is kept. The code
    before this check forced 'disabled' when it was unset. ray.init is replaced: nothing starts."""
    import os

    import ray

    for var in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"):
        monkeypatch.delenv(var, raising=False)
    if mode is not None:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    seen = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: seen.append((k.get("address"), os.environ.get("RAY_AUTH_MODE"))))
    _launch(target, address)
    monkeypatch.setattr("indexing.embedding.running_cluster", lambda: None)  # no cluster recorded on this machine
    assert seen == [(address or "local", mode)]  # init_ray: a Ray of its own, never one already running


def test_no_code_sets_ray_auth_mode():
    """Outside the tests, nothing assigns or defaults RAY_AUTH_MODE (cluster configs set it to token)."""
    pattern = re.compile(r"""(setdefault\(\s*["']RAY_AUTH_MODE|\[\s*["']RAY_AUTH_MODE["']\s*\]\s*=[^=]|putenv\(\s*["']RAY_AUTH_MODE)""")
    packages = [d for d in REPO.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    files = [*REPO.glob("*.py"), *(p for d in packages for p in d.rglob("*.py"))]
    assert any(p.match("serve/launch.py") for p in files) and any(p.match("indexing/embedding.py") for p in files)
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ---------------------------------------------------------------------------------------------
# configs/gpu.yaml on these node types


def test_custom_resources_are_declared(options, cluster):
    problems = undeclared_resources(options, cluster)
    assert not problems, "\n".join(problems)


def test_each_replica_fits_a_node_type(options, cluster):
    problems = unplaceable_replicas(options, cluster)
    assert not problems, "\n".join(problems)


def test_min_replicas_fit_the_min_cluster(options, cluster):
    problems = min_cluster_shortfall(options, cluster)
    assert not problems, "min_replicas do not fit head + min_workers:\n" + "\n".join(problems)


def test_index_job_fits_beside_the_service(gpu_cfg, options, cluster, job):
    ix, caps = gpu_cfg.indexing, capacities(cluster)
    max_gpus = sum(caps[n].get("GPU", 0) * t.get("max_workers", 0) for n, t in cluster["available_node_types"].items())
    assert ix.concurrency * ix.gpus_per_actor <= max_gpus, (
        f"{ix.concurrency} embedder actors x {ix.gpus_per_actor} GPU > {max_gpus:g} GPUs at max_workers"
    )
    problems = index_job_shortfall(gpu_cfg, options, cluster, job)
    assert not problems, "the index job does not fit beside the min_replicas:\n" + "\n".join(problems)


def test_max_replicas_and_an_index_job_fit_the_max_cluster(gpu_cfg, options, cluster, job):
    """Every stage at its max_replicas, with a re-index running, on head + every type's max_workers."""
    problems = pack(deployment_demands(options, bound="max_replicas") + index_job_demands(gpu_cfg, job),
                    cluster_nodes(cluster, worker_counts(cluster, "max_workers")))
    assert not problems, "max_replicas + the index job do not fit head + max_workers:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# the fit checks bite


def _modified(cfg, section: str, **deployment):
    """A copy of ``cfg`` with ``section.deployment`` changed, validated like a loaded file."""
    from common.config import AppConfig

    data = cfg.model_dump()
    data[section]["deployment"].update(deployment)
    return AppConfig.model_validate(data)


BROKEN = {
    "2 GPUs per retriever replica on 1-GPU nodes": (
        "retriever", {"num_gpus": 2}, unplaceable_replicas, "retriever replica"),
    "router pinned to an undeclared resource": (
        "router", {"resources": {"cpu_poool": 0.01}}, undeclared_resources, "'cpu_poool'"),
    "4 generator replicas on 3 min gpu workers": (
        "generator", {"min_replicas": 4}, min_cluster_shortfall, "generator replica"),
    "retriever 24 CPUs per replica": (
        "retriever", {"num_cpus": 24}, unplaceable_replicas, "retriever replica"),
}


@pytest.mark.parametrize("section, change, check, culprit", BROKEN.values(), ids=BROKEN.keys())
def test_fit_checks_reject_impossible_configs(gpu_cfg, cluster, section, change, check, culprit):
    import ray

    from serve.graph import deployment_options

    assert check(deployment_options(gpu_cfg), cluster) == []  # the unmodified config passes the same check
    problems = check(deployment_options(_modified(gpu_cfg, section, **change)), cluster)
    assert problems and any(culprit in p for p in problems), problems
    assert not ray.is_initialized()


def test_index_job_check_rejects_too_many_gpu_actors(gpu_cfg, options, cluster, job):
    ix = gpu_cfg.indexing.model_copy(update={"concurrency": 100, "gpus_per_actor": 0.5})
    problems = index_job_shortfall(gpu_cfg.model_copy(update={"indexing": ix}), options, cluster, job)
    assert any("embedder actor" in p for p in problems), problems
