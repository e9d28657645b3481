"""configs/monitoring/: the Prometheus rules (promtool's unit tests), the scrape configuration, the
Grafana dashboard, and the check that every metric name they query exists.

promtool comes from Debian's ``prometheus`` package, which ``make test`` installs (Makefile target
``promtool``). Without it these tests fail and say so: they are part of the default run.

The rules and the dashboard against a real Prometheus scraping the running graph:
tests/test_serve_graph.py::test_prometheus_scrapes_the_graph_and_the_breaker_alert_fires.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO

MON = REPO / "configs" / "monitoring"
RULES, RULES_TEST, SCRAPE = MON / "rules.yml", MON / "rules_test.yml", MON / "prometheus.yml"
DASHBOARD, EXTERNAL = MON / "dashboard.json", MON / "external_series.txt"
SOURCES = ("rag_", "ray_rag_")  # the dashboard's ${source} options
ALERTS = {
    "RagraphGeneratorBreakerOpen", "RagraphChatLatencyP95High", "RagraphHighErrorRate", "RagraphLoadShed",
    "RagraphStageNoHealthyReplica", "RagraphIndexNotReloaded", "RagraphKeyQuotaNearlySpent",
    "RagraphTimeToFirstTokenP95High", "RagraphMetricsDown",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: `make test` installs it (Debian: apt-get install prometheus); "
                    "the rule tests of configs/monitoring/ cannot run without it")
    return path


def run(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------
# rules


def test_rules_pass_promtool_check_and_unit_tests():
    check = run("check", "rules", RULES.name)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = run("test", "rules", RULES_TEST.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout, tested.stdout


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def test_rule_tests_evaluate_recordings_before_the_alerts_that_read_them():
    """Without ``group_eval_order`` promtool evaluates the groups in Go map order, so an alert reading
    a recorded series sees the previous step's value about one run in seven (CI failed on it)."""
    groups = [g["name"] for g in rule_groups()]
    order = yaml.safe_load(RULES_TEST.read_text()).get("group_eval_order")
    assert order is not None and sorted(order) == sorted(groups), (order, groups)
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    position = {name: i for i, name in enumerate(order)}
    for g in rule_groups():
        for rule in g["rules"]:
            reads = {name for name in recorded if name in rule["expr"]}
            makers = {h["name"] for h in rule_groups() for r in h["rules"] if r.get("record") in reads}
            late = {m for m in makers if position[m] > position[g["name"]]}
            assert not late, f"{rule.get('alert') or rule.get('record')} in {g['name']} reads {sorted(reads)} " \
                             f"recorded in {sorted(late)}, evaluated after it"


def test_every_alert_is_unit_tested_and_has_a_runbook_line():
    alerts = {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}
    assert set(alerts) == ALERTS
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if not a.get("exp_alerts")}
    assert firing == ALERTS and quiet == ALERTS, (ALERTS - firing, ALERTS - quiet)
    ops = (REPO / "docs" / "operations.md").read_text()
    runbook = ops.split("## Alerts", 1)[1].split("\n## ", 1)[0] if "## Alerts" in ops else ""
    for name, rule in alerts.items():
        assert f"`{name}`" in runbook, f"no runbook line for {name} in docs/operations.md ## Alerts"
        assert rule["annotations"]["runbook"] == "docs/operations.md#alerts"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}


@pytest.mark.parametrize("old, new", [
    ("expr: ragraph:generator_breaker_state:max >= 1", "expr: ragraph:generator_breaker_state:max >= 2"),
    ("expr: ragraph:chat_latency_seconds:p95_5m > 5", "expr: ragraph:chat_latency_seconds:p95_5m > 10"),
    ('status=~"5..", status!="503"', 'status=~"5.."'),
    ("expr: ragraph:ttft_seconds:p95_5m > 2\n        for: 10m", "expr: ragraph:ttft_seconds:p95_5m > 2\n        for: 5m"),
    ("and on () (ragraph:retrievals:rate5m > 0)", "and on () (ragraph:retrievals:rate5m >= 0)"),
])
def test_the_rule_tests_catch_a_changed_rule(tmp_path, old, new):
    """The unit tests are tight enough to fail: a copy of the rules with one threshold, window or
    matcher changed fails them."""
    text = RULES.read_text()
    assert old in text
    (tmp_path / "rules.yml").write_text(text.replace(old, new))
    shutil.copy(RULES_TEST, tmp_path / "rules_test.yml")
    tested = run("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert tested.returncode != 0, f"rule tests still pass with {old!r} -> {new!r}"


def test_scrape_configuration_is_valid_and_loads_the_rules():
    check = run("check", "config", SCRAPE.name)
    assert check.returncode == 0, check.stdout + check.stderr
    cfg = yaml.safe_load(SCRAPE.read_text())
    assert cfg["rule_files"] == ["rules.yml"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) == {"ragraph", "ray"} and jobs["ragraph"]["metrics_path"] == "/metrics"


# ---------------------------------------------------------------------------------------------
# dashboard


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries(source: str = "rag_", rate: str = "1m") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target, with the dashboard's variables filled in."""
    out = []
    for p in dashboard()["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"].replace("${source}", source).replace("$__rate_interval", rate)))
    return out


def test_dashboard_is_an_importable_grafana_dashboard():
    """What Grafana's import needs and its dashboard schema requires of these fields: a title
    and uid, panels with unique ids and grid positions inside the 24 columns that do not overlap, a
    Prometheus datasource from the dashboard's variable on every panel and target, and ref ids."""
    d = dashboard()
    assert d["title"] and re.fullmatch(r"[A-Za-z0-9_-]{1,40}", d["uid"]) and isinstance(d["schemaVersion"], int)
    assert "id" not in d or d["id"] is None  # an id would tie the import to one Grafana's database
    names = {v["name"]: v for v in d["templating"]["list"]}
    assert names["datasource"]["type"] == "datasource" and names["datasource"]["query"] == "prometheus"
    assert {o["value"] for o in names["source"]["options"]} == set(SOURCES)
    ids, cells = set(), set()
    for p in d["panels"]:
        assert p["id"] not in ids, p["id"]
        ids.add(p["id"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0, (p["title"], g)
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "gauge"} and p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs)
        assert all(t["datasource"] == p["datasource"] and t["expr"].strip() for t in p["targets"])
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for topic in ("request rate", "latency by endpoint", "per-stage latency", "time to first token",
                  "inter-token", "tokens per second", "queue depth", "replicas", "cache hit", "breaker",
                  "index version", "admissions refused", "serve", "vllm"):
        assert topic in titles, topic


# ---------------------------------------------------------------------------------------------
# every metric name queried exists

FUNCTIONS_AND_KEYWORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "histogram_quantile", "vector", "round",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "max_over_time", "min_over_time", "avg_over_time", "absent", "clamp_min", "clamp_max", "topk", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric (and recording rule) names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    names = set()
    for m in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (endpoint, le) (rate(rag_x_bucket{endpoint!~"/metrics|a"}[5m])))') == {"rag_x_bucket"}
    assert metric_names("(a:b:c unless on (version) d) and on () (e > 0) or vector(0)") == {"a:b:c", "d", "e"}
    assert metric_names('up{job=~"ragraph|ray"} == 0') == {"up"}


def exported_by_the_app(text: str) -> set[str]:
    """Series names a Prometheus scrape of ``text`` yields: the samples, and for a family with no
    sample yet what its TYPE line promises."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            counter = name if name.endswith("_total") else f"{name}_total"  # text format 0.0.4 names it either way
            names |= {"counter": {counter}, "gauge": {name},
                      "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"}}.get(kind, {name})
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][\w:]*", line).group(0))
    return {n for n in names if not n.endswith("_created")}


@pytest.fixture(scope="module")
def scraped(local_cfg, built_index) -> str:
    """GET /metrics of the in-process app (serve/local.py, the routes the graph's ingress serves)
    after a search; the engine is not started (no lifespan), so no chat."""
    from fastapi.testclient import TestClient

    from common.config import AppConfig
    from serve.local import create_app

    data = local_cfg.model_dump()
    data["indexing"]["dir"] = str(built_index[1])
    client = TestClient(create_app(AppConfig.model_validate(data)), base_url="http://127.0.0.1")
    r = client.post("/v1/search", json={"query": "Is parking free?", "top_k": 2})
    assert r.status_code == 200, r.text
    r = client.get("/metrics")
    assert r.status_code == 200
    return r.text


def external_series() -> dict[str, str]:
    out = {}
    for line in EXTERNAL.read_text().splitlines():
        name, _, note = line.partition("#")
        if name.strip():
            out[name.strip()] = note.strip()
    return out


def test_the_app_exports_every_family_it_defines(scraped):
    from flow.metrics import METRICS

    exported = exported_by_the_app(scraped)
    for name, fam in METRICS.families.items():
        want = {"counter": name, "gauge": name, "histogram": f"{name}_bucket"}[fam.kind]
        assert want in exported, f"{want} (flow/metrics.py) missing from GET /metrics"
    # the search counted, the published index read at the scrape
    assert re.search(r'rag_http_requests_total\{[^}]*endpoint="/v1/search"[^}]*status="200"', scraped)
    assert re.search(r'rag_index_published_info\{version="[^"]+"\} 1\.0', scraped)


def test_every_queried_metric_is_exported(scraped):
    exported = exported_by_the_app(scraped)
    through_ray = {f"ray_{n}" for n in exported if n.startswith("rag_")}  # Ray's agent: same names, ray_ prefix
    external = external_series()
    recorded = {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}
    queried: dict[str, set[str]] = {}
    for g in rule_groups():
        for r in g["rules"]:
            for n in metric_names(r["expr"]):
                queried.setdefault(n, set()).add(f"rules.yml {r.get('record') or r.get('alert')}")
    for source in SOURCES:
        for title, expr in dashboard_queries(source):
            for n in metric_names(expr):
                queried.setdefault(n, set()).add(f"dashboard {title!r}")
    assert len(queried) > 30 and "rag_http_requests_total" in queried and "ray_rag_http_requests_total" in queried
    unknown = {n: sorted(w) for n, w in queried.items() if n not in exported | through_ray | set(external) | recorded}
    assert not unknown, f"queried but exported by nothing (add to {EXTERNAL.name} if Ray or vLLM export it): {unknown}"
    unused = set(external) - set(queried)
    assert not unused, f"listed in {EXTERNAL.name} but queried by nothing: {unused}"


def test_external_series_are_defined_by_the_installed_ray_and_vllm():
    """Each Ray Serve series is in Ray's own Serve source or Grafana panels, each vLLM series in vLLM's
    metric definitions (the names change between versions: a stale list fails here)."""
    import ray
    import vllm

    ray_dir, vllm_dir = Path(ray.__file__).parent, Path(vllm.__file__).parent
    serve_src = "".join(p.read_text(errors="replace") for p in (ray_dir / "serve" / "_private").glob("*.py"))
    serve_src += "".join(p.read_text(errors="replace") for p in (ray_dir / "dashboard" / "modules" / "metrics" / "dashboards").glob("*.py"))
    vllm_src = (vllm_dir / "v1" / "metrics" / "loggers.py").read_text()
    for name in external_series():
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        if name.startswith("ray_serve_"):
            assert f'"{base.removeprefix("ray_")}"' in serve_src or name in serve_src, name
        elif name.startswith("ray_vllm_"):
            assert f'"vllm:{base.removeprefix("ray_vllm_")}"' in vllm_src, name
        else:
            assert name == "up", name
