"""The KubeRay manifest (cli/kuberay.py): generated from configs/gpu.yaml and committed; read
back by Ray's own Serve schema and by Ray's KubeRay autoscaler config reader; its worker bounds
follow the config. Fast: no Ray is started, nothing is applied to a Kubernetes cluster."""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from cli import kuberay
from common.config import AppConfig, load_config
from cli.kuberay import KubeRayError

REPO = Path(__file__).resolve().parent.parent
GPU_YAML = REPO / "configs" / "gpu.yaml"
COMMITTED = REPO / "configs" / "kuberay" / "rayservice.yaml"
REGENERATE = "ragraph --config configs/gpu.yaml kuberay --out configs/kuberay/rayservice.yaml"


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return load_config(GPU_YAML, environ={})


@pytest.fixture(scope="module")
def manifest(cfg) -> dict:
    return kuberay.rayservice(cfg)


def changed(cfg: AppConfig, **edits) -> AppConfig:
    """``cfg`` with dotted keys replaced, validated again like a loaded file."""
    data = cfg.model_dump(mode="json")
    for dotted, value in edits.items():
        *path, last = dotted.split("__")
        node = data
        for k in path:
            node = node[k]
        node[last] = value
    return AppConfig.model_validate(data)


def worker(manifest: dict, group: str) -> dict:
    return next(g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == group)


def test_committed_manifest_is_what_gpu_yaml_generates(cfg, monkeypatch):
    text = kuberay.render(cfg, source="configs/gpu.yaml")
    committed = COMMITTED.read_text()
    if text != committed:
        diff = "\n".join(list(difflib.unified_diff(committed.splitlines(), text.splitlines(), "committed",
                                                   "generated", lineterm=""))[:30])
        pytest.fail(f"configs/kuberay/rayservice.yaml is stale; regenerate it with: {REGENERATE}\n{diff}")
    assert "ragraph --config configs/gpu.yaml kuberay" in committed.splitlines()[0]
    monkeypatch.setenv("HOME", "/nonexistent-home")  # nothing in the output depends on this machine
    assert kuberay.render(load_config(GPU_YAML, environ={}), source="configs/gpu.yaml") == committed
    assert str(Path.home()) == "/nonexistent-home"
    for real in {str(REPO), os.path.expanduser("~")} - {"/"}:
        assert real not in committed  # e.g. governor.db, which gpu.yaml leaves at its '~' default


def test_serve_config_validates_with_rays_schema_and_loads_back_into_the_config(manifest, cfg):
    from ray.serve.schema import ServeDeploySchema

    from serve.launch import export_serve_config

    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    raw = manifest["spec"]["serveConfigV2"]
    assert isinstance(raw, str)
    schema = ServeDeploySchema.model_validate(yaml.safe_load(raw))
    (app,) = schema.applications
    assert app.import_path == "serve.graph:app_builder" and app.route_prefix == "/"
    pods = kuberay.pod_config(cfg)  # cfg with governor.db (unused there) as the pods expand its '~' default
    assert AppConfig.model_validate(app.args) == pods
    assert pods.model_dump(exclude={"governor": {"db"}}) == cfg.model_dump(exclude={"governor": {"db"}})
    assert app.args["governor"]["db"] == "/home/ray/.cache/ragraph/governor.sqlite3"
    assert yaml.safe_load(raw) == yaml.safe_load(export_serve_config(pods))  # the same as `ragraph serve --export`


def test_rays_kuberay_autoscaler_reads_the_groups_as_intended(manifest):
    import ray
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__ == kuberay.ray_version()
    assert cluster["enableInTreeAutoscaling"] is True
    types = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "ragraph", "namespace": "default"}, "spec": cluster}
    )["available_node_types"]
    # no custom resource on the head: nothing is pinned there any more (the governor deployment is gone)
    assert {k: v for k, v in types["headgroup"]["resources"].items() if k != "memory"} == {"CPU": 4}
    assert {k: v for k, v in types["cpu"]["resources"].items() if k != "memory"} == {"CPU": 15, "cpu_pool": 1000}
    assert {k: v for k, v in types["gpu"]["resources"].items() if k != "memory"} == {"CPU": 15, "GPU": 1}
    for group in ("cpu", "gpu"):
        spec = worker(manifest, group)
        assert (types[group]["min_workers"], types[group]["max_workers"]) == (spec["minReplicas"], spec["maxReplicas"])
        assert spec["replicas"] == spec["minReplicas"]


POD_CPUS = kuberay.GPU_WORKERS.ray_cpus  # cpu and gpu pods alike: 15 Ray CPUs, and a gpu pod one GPU
GPU_POD = kuberay.GPU_WORKERS.capacity()


def up(x: float) -> int:
    return math.ceil(round(x, 6))


def need(stage: str, *bundles: dict, lo: int = 1, hi: int = 1) -> kuberay.StageNeed:
    return kuberay.StageNeed(stage, bundles, lo, hi)


def test_pack_counts_whole_bundles_and_keeps_two_replicas_apart():
    gen = need("generator", {"GPU": 1, "CPU": 2})
    retriever = need("retriever", {"GPU": 0.25, "CPU": 2}, lo=2, hi=4)
    # The generator leaves its pod no GPU; the two retrievers then go to two more pods, not one.
    assert kuberay.pack([gen, retriever], GPU_POD, replicas="min_replicas") == 3
    assert kuberay.pack([gen, retriever], GPU_POD, replicas="max_replicas") == 3  # 4 x 0.25 fit those two
    assert kuberay.pack([need("x", {"GPU": 0.6}, hi=3)], GPU_POD, replicas="max_replicas") == 3  # 1.8 GPUs summed
    assert kuberay.pack([need("y", {"CPU": 4}, hi=8)], GPU_POD, replicas="max_replicas") == 3  # 3 per 15-CPU pod
    tp2 = need("tp2", {"GPU": 1, "CPU": 2}, {"GPU": 1}, hi=3)  # a bundle per tensor-parallel worker
    assert kuberay.pack([tp2], GPU_POD, replicas="max_replicas") == 6
    assert kuberay.pack([need("z", {"CPU": 1}, lo=0)], GPU_POD, replicas="min_replicas") == 0


def test_gpu_yaml_needs_summed_by_hand_bound_the_pods_from_below(cfg):
    g, r, rr, ix = cfg.generator, cfg.retriever.deployment, cfg.reranker.deployment, cfg.indexing
    gen = g.deployment
    gpus_min = gen.min_replicas * g.tensor_parallel_size + r.min_replicas * r.num_gpus + rr.min_replicas * rr.num_gpus
    gpus_max = (gen.max_replicas * g.tensor_parallel_size + r.max_replicas * r.num_gpus
                + rr.max_replicas * rr.num_gpus + ix.concurrency * ix.gpus_per_actor)
    b = kuberay.group_bounds(cfg)
    assert b["gpu"].min_need["GPU"] == pytest.approx(gpus_min) and b["gpu"].max_need["GPU"] == pytest.approx(gpus_max)
    assert up(gpus_min) <= b["gpu"].min_replicas <= b["gpu"].max_replicas and up(gpus_max) <= b["gpu"].max_replicas
    if gen.min_replicas and r.min_replicas >= 2 and g.tensor_parallel_size == 1:
        assert b["gpu"].min_replicas >= gen.min_replicas + 2  # whole-GPU generators, then two retrievers apart

    h, ro = cfg.http.deployment, cfg.router.deployment
    cpus_min = h.min_replicas * h.num_cpus + ro.min_replicas * ro.num_cpus
    cpus_max = h.max_replicas * h.num_cpus + ro.max_replicas * ro.num_cpus + kuberay.INDEX_DRIVER["CPU"]
    assert (b["cpu"].min_need["CPU"], b["cpu"].max_need["CPU"]) == pytest.approx((cpus_min, cpus_max))
    assert up(cpus_min / POD_CPUS) <= b["cpu"].min_replicas and up(cpus_max / POD_CPUS) <= b["cpu"].max_replicas
    if max(h.min_replicas, ro.min_replicas) >= 2:
        assert b["cpu"].min_replicas >= 2


def test_bounds_respond_to_the_config(cfg):
    base = kuberay.group_bounds(cfg)
    gpu, cpu = base["gpu"], base["cpu"]
    gen, ix, h = cfg.generator.deployment, cfg.indexing, cfg.http.deployment

    more = changed(cfg, generator__deployment__min_replicas=gen.min_replicas + 2)
    assert kuberay.group_bounds(more)["gpu"].min_replicas == gpu.min_replicas + 2  # a whole GPU each
    assert worker(kuberay.rayservice(more), "gpu")["minReplicas"] == gpu.min_replicas + 2

    tp2 = kuberay.group_bounds(changed(cfg, generator__tensor_parallel_size=2))["gpu"]  # a GPU bundle per worker
    assert (tp2.min_replicas, tp2.max_replicas) == (gpu.min_replicas + gen.min_replicas,
                                                    gpu.max_replicas + gen.max_replicas)

    index = kuberay.group_bounds(changed(cfg, indexing__concurrency=ix.concurrency * 2))["gpu"]
    assert index.max_replicas >= up(index.max_need["GPU"]) > gpu.max_replicas

    no_rerank = kuberay.group_bounds(changed(cfg, reranker__enabled=False))["gpu"]
    assert "reranker" not in no_rerank.stages and "reranker" in gpu.stages
    assert no_rerank.max_need["GPU"] < gpu.max_need["GPU"] and no_rerank.max_replicas <= gpu.max_replicas

    ingress = kuberay.group_bounds(changed(cfg, http__deployment__max_replicas=h.max_replicas + 45))["cpu"]
    assert ingress.max_replicas >= up((cpu.max_need["CPU"] + 45 * h.num_cpus) / POD_CPUS) > cpu.max_replicas


def test_pods_mount_the_volumes_and_gpu_pods_ask_for_a_gpu(manifest, cfg):
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts == {"shared": "/mnt/shared"}  # no state volume: the state is in PostgreSQL
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in head["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"shared": "ragraph-shared"}
    text = COMMITTED.read_text()
    assert set(re.findall(r"claimName: (\S+)", text)) == {"ragraph-shared"} and "ReadWriteOnce" not in text
    for what, path in (("indexing.dir", cfg.indexing.dir), ("models.dir", cfg.models.dir),
                       ("documents.spool_dir", cfg.documents.spool_dir)):
        assert Path(path).is_relative_to("/mnt/shared"), (what, path)  # every pod reads them
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    for group in ("cpu", "gpu"):
        pod = worker(manifest, group)["template"]["spec"]
        assert [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]] == ["/mnt/shared"]
        assert pod["containers"][0]["image"] == kuberay.default_image()
    gpu = worker(manifest, "gpu")["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    assert "tolerations" not in worker(manifest, "cpu")["template"]["spec"]


def test_an_accelerator_type_is_advertised_to_the_autoscaler(cfg):
    manifest = kuberay.rayservice(changed(cfg, reranker__deployment__accelerator_type="L4"))
    assert worker(manifest, "gpu")["rayStartParams"]["resources"] == '"{\\"accelerator_type:L4\\": 1}"'
    assert "resources" not in worker(kuberay.rayservice(cfg), "gpu")["rayStartParams"]


def test_configs_that_cannot_run_there_are_refused_with_every_reason(cfg):
    with pytest.raises(KubeRayError) as e:
        kuberay.rayservice(load_config(REPO / "configs" / "local.yaml", environ={}))
    for key in ("http.host", "indexing.dir", "indexing.source", "documents.spool_dir", "state.url"):
        assert key in str(e.value)

    with pytest.raises(KubeRayError, match="no node group offers"):
        kuberay.rayservice(changed(cfg, router__deployment__resources={"edge_pool": 0.01}))
    with pytest.raises(KubeRayError, match=r"asks for \['ragraph_head'\], which no node group offers"):
        kuberay.rayservice(changed(cfg, http__deployment__resources={"ragraph_head": 0.01}))  # the old head pin
    with pytest.raises(KubeRayError, match="does not fit a cpu pod"):
        kuberay.rayservice(changed(cfg, router__deployment__num_cpus=16))
    with pytest.raises(KubeRayError, match="documents.spool_dir=/var/spool/ragraph: .* shared volume"):
        kuberay.rayservice(changed(cfg, documents__spool_dir="/var/spool/ragraph"))
    with pytest.raises(KubeRayError, match="does not fit a gpu pod"):
        kuberay.rayservice(changed(cfg, reranker__deployment__num_gpus=2))
    with pytest.raises(KubeRayError, match="carry 'L4'"):
        kuberay.rayservice(changed(cfg, reranker__deployment__accelerator_type="A100"))


def test_auth_off_on_the_pods_network_is_refused_unless_opted_in(cfg):
    """http.host must be 0.0.0.0 on the pods, so auth off would serve every endpoint without keys to
    the cluster's network: refused as the app builder refuses it, unless http.insecure_auth_off."""
    off = changed(cfg, governor__auth__enabled=False)
    with pytest.raises(KubeRayError, match=r"governor.auth.enabled=false .*http.insecure_auth_off: true"):
        kuberay.rayservice(off)
    opted = kuberay.rayservice(changed(off, http__insecure_auth_off=True))
    assert yaml.safe_load(opted["spec"]["serveConfigV2"])["applications"][0]["args"]["http"]["insecure_auth_off"]


def test_cli_writes_and_checks(tmp_path, monkeypatch, capsys):
    from cli.main import main

    for var in [v for v in os.environ if v.startswith("RAGRAPH")]:
        monkeypatch.delenv(var)  # the committed copy is gpu.yaml without overrides
    base = ["--config", str(GPU_YAML), "kuberay"]

    assert main([*base, "--out", str(COMMITTED), "--check"]) == 0
    assert "up to date" in capsys.readouterr().out

    out = tmp_path / "rayservice.yaml"
    assert main([*base, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_text() == COMMITTED.read_text()
    assert main([*base, "--out", str(out), "--check"]) == 0
    capsys.readouterr()

    text = out.read_text()
    gpu_max = worker(next(yaml.safe_load_all(text)), "gpu")["maxReplicas"]
    before, line, after = text.rpartition(f"maxReplicas: {gpu_max}\n")  # the gpu group's, the last group
    out.write_text(f"{before}maxReplicas: {gpu_max + 1}\n{after}")
    assert main([*base, "--out", str(out), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"-      maxReplicas: {gpu_max + 1}" in err and "2 lines changed" in err
    assert f"regenerate with: ragraph --config configs/gpu.yaml kuberay --out {out}" in err

    assert main([*base, "--out", str(tmp_path / "missing.yaml"), "--check"]) == 1
    assert "the file is missing" in capsys.readouterr().err
    assert main([*base, "--check"]) == 2  # --check needs a file


# ---------------------------------------------------------------------------------------------
# Ray token authentication and the NetworkPolicy in front of the Ray pods

# Labels KubeRay itself puts on the pods it creates (besides the template's).
KUBERAY_HEAD_LABELS = {"ray.io/node-type": "head", "ray.io/is-ray-node": "yes", "ray.io/cluster": "ragraph-raycluster-x1"}
KUBERAY_WORKER_LABELS = {"ray.io/node-type": "worker", "ray.io/is-ray-node": "yes", "ray.io/cluster": "ragraph-raycluster-x1"}
RAY_CONTROL_PORTS = {6379, 8265, 10001}  # GCS, dashboard (job submission), Ray client: code execution
ALL = "all ports"


def committed_list() -> list[dict]:
    return [d for d in yaml.safe_load_all(COMMITTED.read_text()) if d]


def committed_docs() -> dict[str, dict]:
    """The committed manifest's documents by kind (the first NetworkPolicy: the Ray pods'), and every
    NetworkPolicy by name under ``policies``."""
    docs = committed_list()
    out = {d["kind"]: d for d in reversed(docs)}
    out["policies"] = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    return out


def selects(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels only: this module never writes matchExpressions)."""
    assert set(selector) <= {"matchLabels"}, f"selector form not handled here: {selector}"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def admitted(policy: dict, *, source: dict, namespace: dict, same_namespace: bool):
    """The ports of a pod the policy selects that its ingress rules let ``source`` reach: ALL, or a
    set. A source is a pod (its labels) in a namespace (its labels); ``ipBlock`` peers match anyone."""
    ports: set[int] = set()
    for rule in policy["spec"].get("ingress") or []:
        peers = rule.get("from") or []
        ok = not peers
        for peer in peers:
            if "ipBlock" in peer:
                ok = True
            elif "namespaceSelector" in peer:
                ok |= selects(peer["namespaceSelector"], namespace) and selects(peer.get("podSelector", {}), source)
            elif "podSelector" in peer:
                ok |= same_namespace and selects(peer["podSelector"], source)
        if ok:
            if not rule.get("ports"):
                return ALL
            ports |= {p["port"] for p in rule["ports"]}
    return ports


def head_and_worker_labels(manifest: dict) -> tuple[dict, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    head = {**cluster["headGroupSpec"]["template"]["metadata"]["labels"], **KUBERAY_HEAD_LABELS}
    workers = [{**w["template"]["metadata"]["labels"], **KUBERAY_WORKER_LABELS} for w in cluster["workerGroupSpecs"]]
    return head, workers


def policy_problems(policy: dict | None, manifest: dict, serve_port: int) -> list[str]:
    """What is wrong with the NetworkPolicy in front of the head: it must select the head pod, open
    the Serve port to anyone, and the GCS, dashboard and client ports to nobody but this cluster's
    pods and the operator's (labelled) namespace."""
    if policy is None:
        return ["no NetworkPolicy"]
    problems = []
    head, workers = head_and_worker_labels(manifest)
    if "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
        problems.append("the policy does not restrict ingress")
    if not selects(policy["spec"]["podSelector"], head):
        problems.append(f"the podSelector {policy['spec']['podSelector']} does not select the head pod ({head})")
    strangers = {
        "a pod in another namespace": dict(source={"app": "x"}, namespace={"kubernetes.io/metadata.name": "other"},
                                           same_namespace=False),
        "another app's pod in the namespace": dict(source={"app.kubernetes.io/name": "ragraph", "app": "x"},
                                                   namespace={}, same_namespace=True),
        "another RayService's pod": dict(source={**head, "app.kubernetes.io/instance": head.get(
            "app.kubernetes.io/instance", "") + "-2"}, namespace={}, same_namespace=True),
    }
    for who, src in strangers.items():
        got = admitted(policy, **src)
        if got == ALL or got & RAY_CONTROL_PORTS:
            problems.append(f"{who} reaches the head on {got}")
        if got != ALL and serve_port not in got:
            problems.append(f"{who} cannot reach the Serve port {serve_port}")
    for w in workers:  # a worker's raylet and workers talk to the head on many ports (GCS, raylet, objects)
        if admitted(policy, source=w, namespace={}, same_namespace=True) != ALL:
            problems.append(f"a worker pod ({w}) cannot reach every port of the head")
    return problems


def test_token_auth_is_on_with_the_token_from_a_secret(manifest, cfg):
    """KubeRay's authOptions: the operator sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret)
    in every Ray container and sends the token when it calls the dashboard. Fails on a manifest
    without authOptions (the one before this check)."""
    for m in (manifest, committed_docs()["RayService"]):
        cluster = m["spec"]["rayClusterConfig"]
        assert cluster.get("authOptions") == {"mode": "token", "secretName": "ragraph-ray-auth"}, cluster.get("authOptions")
        pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for env in (e for p in pods for c in p["template"]["spec"]["containers"] for e in c.get("env", [])):
            assert not env["name"].startswith("RAY_AUTH"), f"{env}: authOptions sets these (a value here would conflict)"
    other = kuberay.rayservice(cfg, name="other")["spec"]["rayClusterConfig"]["authOptions"]
    assert other == {"mode": "token", "secretName": "other-ray-auth"}
    assert "Secret ragraph-ray-auth (key auth_token)" in COMMITTED.read_text()


def test_network_policy_closes_the_head_to_all_but_its_cluster(manifest, cfg):
    """The NetworkPolicy (second document of the manifest) selects the head pod; from other pods only
    the Serve port gets through; the cluster's own pods reach every port; the dashboard only from the
    operator's labelled namespace, the metrics port only from the scrapers'."""
    docs = committed_docs()
    assert [(d["kind"], d["metadata"]["name"]) for d in committed_list()] == [
        ("RayService", "ragraph"), ("NetworkPolicy", "ragraph-ray-pods"), ("NetworkPolicy", "ragraph-head-egress"),
        ("CronJob", "ragraph-reindex"), ("NetworkPolicy", "ragraph-reindex")]  # CronJob: test_reindex_cronjob_...
    policy = docs["NetworkPolicy"]
    assert policy == kuberay.network_policy(cfg)
    assert policy_problems(policy, manifest, cfg.http.port) == []
    head, workers = head_and_worker_labels(manifest)
    assert selects(policy["spec"]["podSelector"], workers[0])  # the workers' ports are guarded as well
    operator_ns = {"kubernetes.io/metadata.name": "ray-system", "ragraph.io/ray-operator": "true"}
    assert admitted(policy, source={}, namespace=operator_ns, same_namespace=False) == {cfg.http.port, 8265}
    scraper_ns = {"ragraph.io/metrics-scraper": "true"}
    assert admitted(policy, source={}, namespace=scraper_ns, same_namespace=False) == {cfg.http.port, 8080}
    # namespaced with the RayService; another name selects only its own pods
    other = kuberay.network_policy(cfg, name="other", namespace="ns")
    assert other["metadata"]["namespace"] == "ns"
    assert not selects(other["spec"]["podSelector"], head)
    assert policy_problems(other, kuberay.rayservice(cfg, name="other", namespace="ns"), cfg.http.port) == []


@pytest.mark.parametrize("breaker, problem", [
    (lambda p: p["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8265}]}), "reaches the head"),
    (lambda p: p["spec"]["ingress"].append({"from": [{"namespaceSelector": {}}]}), "reaches the head"),
    (lambda p: p["spec"]["ingress"].append({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}), "reaches the head"),
    (lambda p: p["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"].update(x="y"), "worker pod"),
    (lambda p: p["spec"]["podSelector"]["matchLabels"].update({"ray.io/node-type": "worker"}), "does not select the head"),
    (lambda p: p["spec"]["ingress"].pop(0), "cannot reach the Serve port"),
])
def test_policy_check_rejects_open_or_broken_policies(manifest, cfg, breaker, problem):
    """The check above can fail: a policy that opens the dashboard or everything to all, keeps the
    workers out, or misses the head is caught."""
    import copy

    policy = copy.deepcopy(kuberay.network_policy(cfg))
    breaker(policy)
    assert any(problem in p for p in policy_problems(policy, manifest, cfg.http.port)), policy_problems(
        policy, manifest, cfg.http.port)
    assert policy_problems(None, manifest, cfg.http.port) == ["no NetworkPolicy"]


def test_no_ray_was_started():
    import ray

    assert not ray.is_initialized()


def test_reindex_cronjob_submits_ragraph_index_as_a_ray_job(cfg):
    """The scheduled re-index (indexing.reindex_schedule) is the committed manifest's third document: a
    CronJob whose pod submits `ragraph index SOURCE` to the head's dashboard with the Ray token, one
    run at a time. Without a schedule there is none."""
    cron = committed_docs()["CronJob"]
    assert cron == kuberay.reindex_cronjob(cfg)
    assert cron["spec"]["schedule"] == cfg.indexing.reindex_schedule and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]
    (c,) = pod["spec"]["containers"]
    cmd = c["command"]
    assert cmd[:5] == ["ray", "job", "submit", "--address", "http://ragraph-head-svc:8265"]
    assert cmd[cmd.index("--") + 1:] == ["ragraph", "--config", "/home/ray/ragraph/configs/gpu.yaml", "index",
                                         str(cfg.indexing.source)]
    token = next(e for e in c["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "ragraph-ray-auth", "key": "auth_token"}
    # it only submits: `ragraph index` (the job's driver, in a Ray container) opens no state database
    assert [e["name"] for e in c["env"]] == ["RAY_AUTH_MODE", "RAY_AUTH_TOKEN"]
    off = cfg.model_copy(update={"indexing": cfg.indexing.model_copy(update={"reindex_schedule": None})})
    assert kuberay.reindex_cronjob(off) is None and "CronJob" not in kuberay.render(off)


# ---------------------------------------------------------------------------------------------
# The pods run restricted, hold no Kubernetes credential, reach only what they need; hub models pinned


def pods_of(docs: list[dict]) -> list[tuple[str, dict, list[dict]]]:
    """(what, pod spec, its containers and init containers) for every pod the manifest makes, plus the
    autoscaler sidecar KubeRay adds to the head (its securityContext and mounts from autoscalerOptions)."""
    out = []
    for d in docs:
        if d["kind"] == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
            for what, g in groups:
                spec = g["template"]["spec"]
                extra = []
                if what == "head":
                    a = cluster.get("autoscalerOptions") or {}
                    extra = [{"name": "autoscaler (KubeRay's sidecar)", "securityContext": a.get("securityContext"),
                              "volumeMounts": a.get("volumeMounts", [])}]
                out.append((what, spec, spec["containers"] + spec.get("initContainers", []) + extra))
        elif d["kind"] == "CronJob":
            spec = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            out.append(("reindex", spec, spec["containers"] + spec.get("initContainers", [])))
    return out


def restricted_problems(what: str, pod: dict, containers: list[dict]) -> list[str]:
    """What breaks Kubernetes' "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/
    pod-security-standards), and a mounted ServiceAccount token, in one pod."""
    problems = []
    psc = pod.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(host):
            problems.append(f"{what}: {host}")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append(f"{what}: a hostPath volume")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{what}: the ServiceAccount token is mounted into every container")
    if psc.get("runAsUser") == 0:
        problems.append(f"{what}: runAsUser 0")
    for c in containers:
        sc = c.get("securityContext") or {}
        who = f"{what}/{c['name']}"
        if not (sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
            problems.append(f"{who}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) in (None, 0):
            problems.append(f"{who}: no non-zero runAsUser (the image's USER decides)")
        if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{who}: no RuntimeDefault seccomp profile")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{who}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{who}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{who}: capabilities not dropped (drop ALL, add at most NET_BIND_SERVICE)")
    return problems


def test_every_pod_runs_restricted_without_a_serviceaccount_token(manifest, cfg):
    """Every pod (head, workers, the CronJob's) and container (the models init container and KubeRay's
    autoscaler sidecar included) meets the restricted Pod Security Standard: non-root uid, no privilege
    escalation, every capability dropped, RuntimeDefault seccomp; no pod mounts the ServiceAccount
    token, and only the autoscaler (which scales the worker groups through the API) gets a projected
    one; the job containers have a read-only root filesystem. Fails on the manifest before (only
    fsGroup was set)."""
    docs = committed_list()
    cron = kuberay.reindex_cronjob(cfg)
    for ds in (docs, [manifest, cron]):
        pods = pods_of(ds)
        assert {w for w, _, _ in pods} == {"head", "cpu", "gpu", "reindex"}
        assert [p for w, spec, cs in pods for p in restricted_problems(w, spec, cs)] == []
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    mounts = [(c["name"], m["mountPath"]) for _, _, cs in pods_of([manifest, cron]) for c in cs
              for m in c.get("volumeMounts", []) if m["mountPath"].startswith("/var/run/secrets")]
    assert mounts == [("autoscaler (KubeRay's sidecar)", kuberay.SA_TOKEN_DIR)]
    from ray.autoscaler._private.kuberay import node_provider

    assert node_provider.IN_CLUSTER_TOKEN_PATH == f"{kuberay.SA_TOKEN_DIR}/token"  # where it reads the token
    (token,) = [v for v in head["volumes"] if v["name"] == "autoscaler-token"]
    sources = {k for src in token["projected"]["sources"] for k in src}
    assert sources == {"serviceAccountToken", "configMap", "downwardAPI"}  # token, ca.crt, namespace
    read_only = {c["name"]: (c.get("securityContext") or {}).get("readOnlyRootFilesystem")
                 for _, _, cs in pods_of([manifest, cron]) for c in cs}
    assert read_only["models"] is read_only["reindex"] is True
    for _, spec, cs in pods_of([manifest, cron]):  # a read-only root has a writable /tmp
        for c in cs:
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem"):
                tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
                assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])


@pytest.mark.parametrize("breaker, problem", [
    (lambda pod, c: pod["securityContext"].pop("runAsNonRoot") and c["securityContext"].pop("runAsNonRoot"),
     "runAsNonRoot"),
    (lambda pod, c: c["securityContext"].update(allowPrivilegeEscalation=True), "allowPrivilegeEscalation"),
    (lambda pod, c: c["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "capabilities"),
    (lambda pod, c: pod["securityContext"].pop("seccompProfile"), "seccomp"),
    (lambda pod, c: pod.pop("automountServiceAccountToken"), "ServiceAccount token"),
    (lambda pod, c: pod.update(hostNetwork=True), "hostNetwork"),
])
def test_restricted_check_catches_each_break(manifest, breaker, problem):
    import copy

    m = copy.deepcopy(manifest)
    what, pod, containers = pods_of([m])[1]  # a cpu worker
    breaker(pod, containers[0])
    assert any(problem in p for p in restricted_problems(what, pod, containers))


def _peer_matches(peer: dict, dest: dict) -> bool:
    import ipaddress

    if "ipBlock" in peer:
        if "ip" not in dest:
            return False
        ip, block = ipaddress.ip_address(dest["ip"]), peer["ipBlock"]
        net = ipaddress.ip_network(block["cidr"])
        return ip.version == net.version and ip in net and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []) if ipaddress.ip_network(e).version == ip.version)
    if "ip" in dest:  # an address outside the cluster is no pod
        return False
    if "namespaceSelector" in peer:
        return selects(peer["namespaceSelector"], dest["namespace"]) and selects(peer.get("podSelector", {}), dest["pod"])
    return dest["same_namespace"] and selects(peer["podSelector"], dest["pod"])


def egress_allowed(policies: list[dict], source: dict, dest: dict, port: int, protocol: str = "TCP") -> bool:
    """Kubernetes' egress rule: a pod no Egress policy selects may go anywhere; else it may reach
    ``dest`` (a pod: its labels and namespace's, or ``{"ip": ...}``) on ``port`` when a rule of a policy
    selecting it allows it."""
    mine = [p for p in policies if selects(p["spec"]["podSelector"], source)
            and "Egress" in p["spec"].get("policyTypes", [])]
    if not mine:
        return True
    for p in mine:
        for rule in p["spec"].get("egress") or []:
            peers_ok = not rule.get("to") or any(_peer_matches(peer, dest) for peer in rule["to"])
            ports = rule.get("ports")
            port_ok = not ports or any(x.get("protocol", "TCP") == protocol and x.get("port") == port for x in ports)
            if peers_ok and port_ok:
                return True
    return False


def manifest_pods(docs: list[dict]) -> dict[str, dict]:
    """The labels each pod kind ends up with (KubeRay adds its own to the Ray pods)."""
    rs = next(d for d in docs if d["kind"] == "RayService")
    head, workers = head_and_worker_labels(rs)
    cron = next(d for d in docs if d["kind"] == "CronJob")
    return {"head": head, "worker": workers[0], "gpu worker": workers[1],
            "reindex": cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]}


def test_egress_is_dns_and_the_cluster_plus_what_the_config_needs(cfg):
    """Every pod is egress-isolated: the Ray pods reach each other on any port and the cluster DNS; the
    head also HTTPS beyond the cluster (the API server for the autoscaler, the model hub for the init
    container) but never the instance metadata service; the CronJob only the DNS and the head's
    dashboard. The ports of the state database (state.url) and of Redis (governor.rate_limits.storage,
    governor.cache.storage) are open from the Ray pods only. Fails on the manifest before (no policy
    restricted egress; then no PostgreSQL port)."""
    docs = committed_list()
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    pods = manifest_pods(docs)
    dns = {"pod": {"k8s-app": "kube-dns"}, "namespace": {"kubernetes.io/metadata.name": "kube-system"},
           "same_namespace": False}

    def pod(labels: dict) -> dict:
        return {"pod": labels, "namespace": {}, "same_namespace": True}

    stranger = {"pod": {"app": "postgres"}, "namespace": {"kubernetes.io/metadata.name": "db"}, "same_namespace": False}
    internet, metadata = {"ip": "93.184.216.34"}, {"ip": "169.254.169.254"}
    database = {"ip": "10.0.5.20"}  # ragraph-db.internal, a managed PostgreSQL outside the cluster
    for who, labels in pods.items():
        assert egress_allowed(policies, labels, dns, 53, "UDP") and egress_allowed(policies, labels, dns, 53), who
        assert not egress_allowed(policies, labels, stranger, 3306), who
        ray_pod = who != "reindex"
        for dest in (stranger, database):  # every ingress replica opens state.url; the GCS and replicas reach Redis
            assert egress_allowed(policies, labels, dest, 5432) is ray_pod, who
            assert egress_allowed(policies, labels, dest, 6379) is ray_pod, who
        assert not egress_allowed(policies, labels, metadata, 80) and not egress_allowed(policies, labels, metadata, 443)
        assert not egress_allowed(policies, labels, internet, 80), who
    for who in ("head", "worker", "gpu worker"):
        for other in ("head", "worker", "gpu worker"):
            assert egress_allowed(policies, pods[who], pod(pods[other]), 6379) and \
                egress_allowed(policies, pods[who], pod(pods[other]), 41234)
        assert not egress_allowed(policies, pods[who], pod(pods["reindex"]), 8265)
    assert egress_allowed(policies, pods["head"], internet, 443) and egress_allowed(policies, pods["head"], internet, 6443)
    assert egress_allowed(policies, pods["head"], {"ip": "2001:db8::1"}, 443)
    assert not egress_allowed(policies, pods["worker"], internet, 443)
    assert not egress_allowed(policies, pods["gpu worker"], internet, 443)
    r = pods["reindex"]
    assert egress_allowed(policies, r, pod(pods["head"]), 8265)
    assert not egress_allowed(policies, r, pod(pods["head"]), 6379)
    assert not egress_allowed(policies, r, pod(pods["worker"]), 8265)
    assert not egress_allowed(policies, r, internet, 443)

    assert kuberay.config_egress(cfg) == [{"ports": [{"protocol": "TCP", "port": 5432}, {"protocol": "TCP", "port": 6379}]}]
    moved = changed(cfg, governor__rate_limits__storage="redis://ratelimits.cache:6380/0",
                    state__url="postgresql+psycopg://ragraph@db.example:6432/ragraph")
    policy = kuberay.network_policy(moved)
    for port in (6380, 6379, 6432):  # the limits' Redis, the cache's (still 6379), PgBouncer's port
        assert egress_allowed([policy], pods["worker"], database, port), port
    assert not egress_allowed([policy], pods["worker"], database, 5432)
    assert not any(p["port"] == 6380 for rule in kuberay.network_policy(cfg)["spec"]["egress"] for p in rule.get("ports", []))


def test_the_cronjob_has_its_own_label_and_reaches_only_the_dashboard():
    """The CronJob's pod carries its own component label, so the rule that gives the Ray pods every
    port of each other does not select it: from it the head admits only the dashboard (job
    submission) and the Serve port. Fails on the manifest before (the pod had the Ray pods' labels
    and got every port)."""
    docs = committed_docs()
    pods = manifest_pods(committed_list())
    got = admitted(docs["NetworkPolicy"], source=pods["reindex"], namespace={}, same_namespace=True)
    assert got == {8000, kuberay.DASHBOARD_PORT}, got
    assert pods["reindex"].get("app.kubernetes.io/component") == "reindex" != pods["head"].get("app.kubernetes.io/component")
    assert not selects(docs["NetworkPolicy"]["spec"]["podSelector"], pods["reindex"])
    inbound = docs["policies"]["ragraph-reindex"]
    assert admitted(inbound, source=pods["head"], namespace={}, same_namespace=True) == set()  # nothing gets in


def test_hub_models_are_pinned_to_a_commit(cfg):
    """A hub model without a commit (the revision null before) or with a branch or tag is refused, with
    the command that finds the commit; gpu.yaml pins its three; models.dir must be on the shared volume
    (the init container writes there, every engine reads there)."""
    import re

    args = yaml.safe_load(committed_docs()["RayService"]["spec"]["serveConfigV2"])["applications"][0]["args"]
    for role in ("embedder", "generator", "reranker"):
        assert args["models"][role]["source"] == "hub" and re.fullmatch(r"[0-9a-f]{40}", str(args["models"][role]["revision"])), role
    with pytest.raises(KubeRayError) as e:
        kuberay.rayservice(changed(cfg, models__generator__revision=None, models__reranker__revision="main"))
    assert "models.generator.revision=None" in str(e.value) and "models.reranker.revision='main'" in str(e.value)
    assert "model_info('Qwen/Qwen2.5-7B-Instruct').sha" in str(e.value) and "embedder" not in str(e.value)
    with pytest.raises(KubeRayError, match="models.dir=/models is not under /mnt/shared"):
        kuberay.rayservice(changed(cfg, models__dir="/models"))


# ---------------------------------------------------------------------------------------------
# The state: one PostgreSQL every ingress replica shares, its password from a Secret; Redis for the
# counters, the cache and the GCS


STATE_ENV = {"name": "RAGRAPH__STATE__URL", "valueFrom": {"secretKeyRef": {"name": "ragraph-state", "key": "url"}}}
# a URL with a password in it: scheme://user:password@host
PASSWORD_URL = re.compile(r"[a-z+]+://[^\s/@:]*:[^\s/@]+@")


def ray_containers(manifest: dict) -> dict[str, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    return {f"{what}/{c['name']}": c for what, g in groups for c in g["template"]["spec"]["containers"]}


def test_the_state_must_be_one_postgresql_without_its_password(cfg):
    """Every ingress replica opens state.url itself, on whatever pod it runs: unset (each pod's own SQLite
    file governor.db) and SQLite are refused, with the Secret to use; so is a password in the URL, which
    would be written into serveConfigV2. Fails on the generator before (it wanted governor.db on the
    head's volume and accepted any state.url)."""
    assert cfg.state.url.startswith("postgresql+psycopg://") and kuberay.rayservice(cfg)
    for url, problem in [
        (None, "state.url is unset: every pod would open a SQLite file of its own"),
        ("sqlite:////mnt/shared/ragraph/state.sqlite3", "sqlite is one machine's file"),
        ("postgresql+psycopg://ragraph:hunter2@ragraph-db.internal:5432/ragraph", "state.url carries a password"),
    ]:
        with pytest.raises(KubeRayError) as e:
            kuberay.rayservice(changed(cfg, state__url=url))
        assert problem in str(e.value), str(e.value)
        assert "RAGRAPH__STATE__URL from the Secret ragraph-state (key url)" in str(e.value)
        assert "hunter2" not in str(e.value)
    with pytest.raises(KubeRayError, match="from the Secret other-state"):
        kuberay.rayservice(changed(cfg, state__url=None), name="other")
    with pytest.raises(KubeRayError, match="governor.cache.storage carries a password"):
        kuberay.rayservice(changed(cfg, governor__cache__storage="redis://:hunter2@ragraph-redis.internal:6379/1"))


def test_memory_storage_is_refused_with_several_ingress_replicas(cfg):
    """With several ingress replicas, memory:// rate limits would count per replica (common.config refuses
    that with auth on; here also with auth off) and a memory:// cache would be one per replica: both must
    be a Redis. One ingress replica may keep them in memory, as long as one of them names the GCS's Redis."""
    from pydantic import ValidationError

    assert cfg.http.deployment.max_replicas > 1
    with pytest.raises(KubeRayError, match=r"governor.cache.storage is memory:// with up to 8 ingress replicas"):
        kuberay.rayservice(changed(cfg, governor__cache__storage="memory://"))
    with pytest.raises(ValidationError, match="governor.rate_limits.storage is memory://"):  # the config's own check
        changed(cfg, governor__rate_limits__storage="memory://")
    open_ = changed(cfg, governor__auth__enabled=False, http__insecure_auth_off=True,
                    governor__rate_limits__storage="memory://")
    with pytest.raises(KubeRayError, match=r"governor.rate_limits.storage is memory:// with up to 8") as e:
        kuberay.rayservice(open_)
    assert "governor.cache.storage is memory" not in str(e.value)
    one = changed(cfg, http__deployment__min_replicas=1, http__deployment__max_replicas=1,
                  governor__cache__storage="memory://")
    assert kuberay.rayservice(one)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    with pytest.raises(KubeRayError, match="neither governor.rate_limits.storage nor governor.cache.storage is a "
                                           "redis:// URL"):
        kuberay.rayservice(changed(one, governor__rate_limits__storage="memory://"))
    # rate limits off: their storage is not used; the cache's Redis is the GCS's then
    off = changed(cfg, governor__rate_limits__enabled=False, governor__rate_limits__storage="memory://",
                  governor__cache__storage="redis://answers.cache:6390/1")
    assert kuberay.rayservice(off)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == \
        "answers.cache:6390"


def test_every_ray_container_gets_the_state_url_from_the_secret(manifest, cfg):
    """The head's and every worker's Ray container (the ingress replicas run on the cpu workers; `ragraph
    keys` runs in the head's) get RAGRAPH__STATE__URL, the whole URL, from the Secret ragraph-state; the
    models init container and the CronJob (which only submits the job) do not; and nothing in the
    manifest is a URL with a password. Fails on the manifest before (no such variable anywhere)."""
    docs = committed_list()
    for m in (manifest, docs[0]):
        containers = ray_containers(m)
        assert set(containers) == {"head/ray-head", "cpu/ray-worker", "gpu/ray-worker"}
        for who, c in containers.items():
            assert [e for e in c["env"] if e["name"] == "RAGRAPH__STATE__URL"] == [STATE_ENV], who
        init = m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]
        assert all(e["name"] != "RAGRAPH__STATE__URL" for c in init for e in c.get("env", []))
    other = ray_containers(kuberay.rayservice(cfg, name="other"))["cpu/ray-worker"]
    assert {"name": "other-state", "key": "url"} in [e.get("valueFrom", {}).get("secretKeyRef") for e in other["env"]]
    text = COMMITTED.read_text()
    assert not PASSWORD_URL.search(text), PASSWORD_URL.search(text)
    assert PASSWORD_URL.search("url: postgresql+psycopg://ragraph:hunter2@ragraph-db.internal:5432/ragraph")
    args = yaml.safe_load(docs[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["state"]["url"] == cfg.state.url  # the URL without its password; the Secret's replaces it
    assert "Secrets ragraph-state (key url" in text


def test_the_gcs_keeps_its_tables_in_the_configs_redis(manifest, cfg):
    """GCS fault tolerance (KubeRay >= 1.3): the GCS writes to the Redis of governor.rate_limits.storage
    (its host and port as Ray parses an address), the password from the Secret ragraph-redis, never in the
    manifest; TLS (rediss://) is kept. Fails on the manifest before (no gcsFaultToleranceOptions: a lost
    head pod restarted the whole cluster)."""
    from urllib.parse import urlsplit

    from ray._private.services import get_address

    assert tuple(int(x) for x in kuberay.KUBERAY_MIN.split(".")) >= (1, 3)
    limits = urlsplit(cfg.governor.rate_limits.storage)
    for m in (manifest, committed_docs()["RayService"]):
        ft = m["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
        assert ft == {"redisAddress": "ragraph-redis.internal:6379",
                      "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "ragraph-redis", "key": "password"}}}}
        assert get_address(ft["redisAddress"]) == (limits.hostname, str(limits.port or 6379), False)
        head = m["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert not any("redis" in k for k in head["rayStartParams"])  # KubeRay refuses a password set twice
    tls = changed(cfg, governor__rate_limits__storage="rediss://limits.example:6380/0")
    address = kuberay.rayservice(tls)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"]
    assert address == "rediss://limits.example:6380" and get_address(address) == ("limits.example", "6380", True)
    other = kuberay.rayservice(cfg, name="other")["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert other["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "other-redis"
    assert "ragraph-redis (key password" in COMMITTED.read_text()


def test_every_ray_container_gets_the_redis_password_from_the_secret(manifest):
    """The limits and cache of every replica connect to the Redis URLs of the config, which carry no
    password, with RAGRAPH_REDIS_PASSWORD from the Secret ragraph-redis (the GCS's); the committed
    manifest is the generated one. Fails on the manifest before (no such variable)."""
    want = {"name": "RAGRAPH_REDIS_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "ragraph-redis", "key": "password"}}}
    for m in (manifest, committed_list()[0]):
        for who, c in ray_containers(m).items():
            assert [e for e in c["env"] if e["name"] == "RAGRAPH_REDIS_PASSWORD"] == [want], who
