"""Numbers from samples: percentiles, throughput, errors by status, stage breakdown; and the
report files (``report.json`` with every raw sample, ``report.md``, PNG plots)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from load_tests.client import Sample

PCTS = (50, 90, 95, 99)
STAGES = ("router", "retriever", "reranker", "prompt", "generator.first_token", "generator")


def _pcts(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"{prefix}p{p}_ms": None for p in PCTS}
    arr = np.percentile(np.asarray(values, dtype=float), PCTS)
    return {f"{prefix}p{p}_ms": round(float(v), 2) for p, v in zip(PCTS, arr, strict=True)}


def error_key(s: Sample) -> str:
    """Errors by status: the HTTP status code, or the kind of failure when no response came."""
    return str(s.status) if s.status else s.error or "unknown"


def summarize(samples: list[Sample], window_s: float) -> dict[str, Any]:
    """Percentiles are over successful requests; errors are counted by status (or kind)."""
    ok = [s for s in samples if s.ok]
    streamed = [s for s in ok if s.ttft_ms is not None]
    gaps = [g for s in streamed for g in s.itl_ms]
    window = max(window_s, 1e-9)
    out: dict[str, Any] = {
        "requests": len(samples),
        "ok": len(ok),
        "error_rate": round(1 - len(ok) / len(samples), 4) if samples else 0.0,
        "errors": dict(Counter(error_key(s) for s in samples if not s.ok)),
        "window_s": round(window_s, 2),
        **_pcts([s.e2e_ms for s in ok], ""),
        "mean_ms": round(float(np.mean([s.e2e_ms for s in ok])), 2) if ok else None,
        **_pcts([s.ttft_ms for s in streamed], "ttft_"),
        **_pcts(gaps, "itl_"),
        "throughput_rps": round(len(ok) / window, 3),
        "output_tokens": sum(s.output_tokens for s in ok),
        "output_tokens_per_s": round(sum(s.output_tokens for s in ok) / window, 2),
        "degraded": sum(1 for s in ok if s.rag_status not in (None, "ok")),
        "by_kind": {},
        "stages_p50_ms": {},
        "stages_p95_ms": {},
    }
    for kind in sorted({s.kind for s in samples}):
        ks = [s for s in samples if s.kind == kind]
        kok = [s for s in ks if s.ok]
        out["by_kind"][kind] = {"requests": len(ks), "ok": len(kok), **_pcts([s.e2e_ms for s in kok], "")}
    for stage in sorted({k for s in ok for k in s.stages_ms}):
        vals = [s.stages_ms[stage] for s in ok if stage in s.stages_ms]
        p50, p95 = np.percentile(vals, [50, 95])
        out["stages_p50_ms"][stage] = round(float(p50), 2)
        out["stages_p95_ms"][stage] = round(float(p95), 2)
    return out


def cross_check(client: dict[str, Any], server_delta: dict[str, float], samples: list[Sample]) -> dict[str, Any]:
    """The server's own counters (a ``/metrics`` delta over the run) against what the client saw.
    With several ingress replicas each keeps its own counters, so one scrape sees part of them."""
    if not server_delta:
        return {"available": False, "note": "/metrics could not be read before and after the run"}

    def server(name: str, **labels: str) -> float:
        want = [f"{k}={v}" for k, v in labels.items()]
        return sum(v for k, v in server_delta.items()
                   if k.startswith(name + "{") and all(w in k for w in want))

    chat_ok = sum(1 for s in samples if s.ok and s.kind != "search")
    search_ok = sum(1 for s in samples if s.ok and s.kind == "search")
    rows = {
        "chat 200": (chat_ok, server("rag_http_requests_total", endpoint="/v1/chat/completions", status="200")),
        "search 200": (search_ok, server("rag_http_requests_total", endpoint="/v1/search", status="200")),
        "completion tokens": (client["output_tokens"], server("rag_generation_tokens_total", kind="completion")),
        "non-200 responses": (
            sum(1 for s in samples if s.status and s.status != 200),
            sum(v for k, v in server_delta.items() if k.startswith("rag_http_requests_total{")
                and "status=200" not in k and "/metrics" not in k and "/health" not in k),
        ),
    }
    return {"available": True,
            "rows": {k: {"client": c, "server": s, "agree": abs(c - s) < 0.5} for k, (c, s) in rows.items()}}


# ---------------------------------------------------------------------------------------------
# files


def write_report(out: Path, report: dict[str, Any], samples: list[Sample], *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "samples": [s.to_dict() for s in samples]}, indent=1))
    plots = plot(out, report, samples) if plots else []
    (out / "report.md").write_text(markdown(report, plots))
    return [out / "report.json", out / "report.md", *plots]


def _ms(v: Any) -> str:
    return "–" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def markdown(report: dict[str, Any], plots: list[Path]) -> str:
    r, unit = report, "req/s" if report["mode"] == "open" else "users"
    lines = [
        f"# Load test: {r['url']}",
        "",
        f"{r['started']}, {r['machine']}. Mode **{r['mode']}**{' (sweep)' if r['sweep'] else ''}, "
        f"mix {r['workload']['mix']}, max tokens {r['workload']['max_tokens']}, "
        f"{r['workload']['questions']} questions from {r['workload']['source']}.",
        "",
        f"`{r['command']}`",
        "",
    ]
    if r["sweep"]:
        k = r["knee"]
        lines += [f"**Knee: {k} {unit}** (highest load with p95 <= {r['slo_p95_ms']:g} ms and "
                  f"error rate <= {r['max_error_rate']:.0%})." if k is not None else
                  f"**No knee**: even the lowest load missed p95 <= {r['slo_p95_ms']:g} ms or the error bound.", ""]
    lines += ["| load | requests | ok | errors | p50 ms | p90 ms | p95 ms | p99 ms | TTFT p50 | ITL p50 | req/s | tok/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for st in r["steps"]:
        s = st["summary"]
        errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        lines.append(f"| {st['load']:g} {unit} | {s['requests']} | {s['ok']} | {errs} | {_ms(s['p50_ms'])} | "
                     f"{_ms(s['p90_ms'])} | {_ms(s['p95_ms'])} | {_ms(s['p99_ms'])} | {_ms(s['ttft_p50_ms'])} | "
                     f"{_ms(s['itl_p50_ms'])} | {s['throughput_rps']:.2f} | {s['output_tokens_per_s']:.1f} |")
    lines += ["", "## Stages (p50 / p95 ms, from the response metadata)", "",
              "| load | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
    for st in r["steps"]:
        s = st["summary"]
        cells = [f"{_ms(s['stages_p50_ms'].get(g))} / {_ms(s['stages_p95_ms'].get(g))}" for g in STAGES]
        lines.append(f"| {st['load']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## By request kind (whole run)", "", "| kind | requests | ok | p50 ms | p95 ms |", "|---|---|---|---|---|"]
    for kind, s in r["by_kind"].items():
        lines.append(f"| {kind} | {s['requests']} | {s['ok']} | {_ms(s['p50_ms'])} | {_ms(s['p95_ms'])} |")
    cc = r["cross_check"]
    lines += ["", "## Server counters (`/metrics` delta) against the client", ""]
    if cc["available"]:
        lines += ["| count | client | server | agree |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['client']:g} | {v['server']:g} | {'yes' if v['agree'] else 'NO'} |" for k, v in cc["rows"].items()]
    else:
        lines.append(cc["note"])
    if r.get("failures"):
        lines += ["", "## First failures", ""] + [f"- {f}" for f in r["failures"]]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(out: Path, report: dict[str, Any], samples: list[Sample]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    loads = [st["load"] for st in steps]
    xlabel = "offered load (requests/s)" if report["mode"] == "open" else "offered load (concurrent users)"
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for p, style in zip(PCTS, ("o-", "s--", "^-", "v:"), strict=True):
        ax.plot(loads, [st["summary"][f"p{p}_ms"] or np.nan for st in steps], style, label=f"p{p}")
    if report.get("slo_p95_ms"):
        ax.axhline(report["slo_p95_ms"], color="grey", lw=0.8, ls="--", label="SLO (p95)")
    ax.set(xlabel=xlabel, ylabel="end-to-end latency (ms)", title="Latency percentiles against offered load")
    ax.legend()
    save(fig, "latency_vs_load.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(loads, [st["summary"]["throughput_rps"] for st in steps], "o-", label="answered (200) req/s")
    if report["mode"] == "open":
        ax.plot(loads, loads, ":", color="grey", label="offered")
    ax.set(xlabel=xlabel, ylabel="requests/s", title="Throughput against offered load")
    ax2 = ax.twinx()
    ax2.plot(loads, [st["summary"]["output_tokens_per_s"] for st in steps], "s--", color="tab:orange", label="output tokens/s")
    ax2.set_ylabel("output tokens/s")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    save(fig, "throughput_vs_load.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ttft = [s.ttft_ms for s in samples if s.ok and s.ttft_ms is not None]
    if ttft:
        ax.hist(ttft, bins=min(50, max(5, len(ttft) // 3)), color="tab:blue")
        ax.axvline(float(np.median(ttft)), color="k", ls="--", label=f"p50 {np.median(ttft):.0f} ms")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no streamed answers in this run", ha="center", transform=ax.transAxes)
    ax.set(xlabel="time to first token (ms)", ylabel="requests", title="TTFT distribution (streamed chat)")
    save(fig, "ttft.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    bottom = np.zeros(len(steps))
    for stage in STAGES:
        if stage == "generator.first_token":
            continue  # part of "generator"
        vals = np.array([st["summary"]["stages_p50_ms"].get(stage, 0.0) for st in steps])
        ax.bar([str(x) for x in loads], vals, bottom=bottom, label=stage)
        bottom += vals
    ax.set(xlabel=xlabel, ylabel="p50 ms", title="Per-stage latency (p50, from response metadata)")
    ax.legend(fontsize=8)
    save(fig, "stages.png")

    fig, ax = plt.subplots(figsize=(6.4, 4))
    good = [s for s in samples if s.ok]
    bad = [s for s in samples if not s.ok]
    ax.scatter([s.start_s for s in good], [s.e2e_ms for s in good], s=6, label="200")
    for key in sorted({error_key(s) for s in bad}):
        pts = [s for s in bad if error_key(s) == key]
        ax.scatter([s.start_s for s in pts], [s.e2e_ms or 0 for s in pts], s=10, marker="x", label=key)
    ax.set(xlabel="request sent at (s)", ylabel="end-to-end latency (ms)", title="Every request over time")
    ax.legend(fontsize=8)
    save(fig, "timeline.png")
    return paths
