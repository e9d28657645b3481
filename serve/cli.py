"""The ``ragraph`` command. Each subcommand is added when it works."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from serve.config import ConfigError, dump_config, load_config


def _models(args: argparse.Namespace) -> int:
    # Imported here so `ragraph config` does not pay for it.
    from serve.models import ModelSourceError, broken_cuda_packages, provision_all

    _offline()
    cfg = load_config(args.config)
    models = cfg.models
    if args.dir is not None:
        models = models.model_copy(update={"dir": args.dir.expanduser()})
    if cfg.generator.device == "cpu" and (bad := broken_cuda_packages()):
        print(
            f"warning: {', '.join(bad)} installed: CUDA builds of these break transformers and vLLM on CPU; "
            f"fix: .venv/bin/pip uninstall -y {' '.join(bad)}  (make does this)",
            file=sys.stderr,
        )
    print(f"ragraph models: provisioning into {models.dir}")
    t0 = time.perf_counter()
    try:
        reports = provision_all(models, force=args.force, recheck=args.verify)
    except ModelSourceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    for r in reports:
        took = sum(s.seconds for s in r.steps)
        print(f"{r.role:<9} {r.name:<24} {r.status:<11} {took:6.1f} s  {r.location}")
        if r.check:
            print(f"{'':<9} check: {r.check}")
        if r.checksum:
            print(f"{'':<9} sha256: {r.checksum}")
    print(f"all models ready in {time.perf_counter() - t0:.1f} s")
    return 0


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.show:
        print(dump_config(cfg), end="")
    else:
        print(f"config {args.config or os.environ.get('RAGRAPH_CONFIG') or 'configs/local.yaml'} is valid")
    return 0


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _index(args: argparse.Namespace) -> int:
    from indexing.documents import SourceError
    from indexing.jobs import index_source
    from indexing.store import IndexBuildError

    _offline()
    cfg = load_config(args.config)
    source = args.source or cfg.indexing.source
    root = (args.index_dir or cfg.indexing.dir).expanduser()
    print(f"ragraph index: {source} -> {root}{' (full rebuild)' if args.full else ''}")
    try:
        report = index_source(cfg, source, root, full=args.full)
    except (SourceError, IndexBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for what in ("added", "changed", "removed"):
        docs = getattr(report, what)
        if docs:
            shown = ", ".join(docs[:10]) + (f" and {len(docs) - 10} more" if len(docs) > 10 else "")
            print(f"  {what}: {shown}")
    print(report.summary())
    print(f"done in {report.seconds.get('total', 0):.1f} s (embedding engine: {report.engine})")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from deployments.retriever import HybridRetriever
    from indexing.evaluate import DatasetError, dataset_key, evaluate, load_beir
    from indexing.jobs import index_source, settings_from_config

    _offline()
    cfg = load_config(args.config)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        queries, qrels = load_beir(args.dataset)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    root = args.cache_dir.expanduser() / dataset_key(args.dataset, settings_from_config(cfg))
    report = index_source(cfg, args.dataset, root, log=log)
    log(report.summary())
    retriever = HybridRetriever.from_config(cfg, index_dir=root)
    retriever.warm_up()
    reranker = None
    if args.pipeline == "full" and cfg.reranker.enabled:
        from deployments.reranker import CrossEncoderReranker

        reranker = CrossEncoderReranker.from_config(cfg)
        reranker.warm_up()
    result = evaluate(args.pipeline, args.dataset, queries, qrels, retriever=retriever, reranker=reranker, log=log)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>14}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragraph", description="Retrieval-augmented chat on Ray Serve.")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $RAGRAPH_CONFIG, then configs/local.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("models", help="provision and verify the models the config needs (no hub)")
    m.add_argument("--dir", type=Path, default=None, help="model folder (default: models.dir of the config)")
    m.add_argument("--force", action="store_true", help="rebuild every model even if it is up to date")
    m.add_argument("--verify", action="store_true", help="load and run up-to-date models again")
    m.set_defaults(func=_models)

    i = sub.add_parser("index", help="index a source (folder, .jsonl, .parquet) into a new index version")
    i.add_argument("source", type=Path, nargs="?", default=None, help="what to index (default: indexing.source)")
    i.add_argument("--full", action="store_true", help="re-embed everything, reusing no vector")
    i.add_argument("--index-dir", type=Path, default=None, help="index root (default: indexing.dir)")
    i.set_defaults(func=_index)

    e = sub.add_parser("eval", help="score a retrieval pipeline on a BEIR-format folder")
    e.add_argument("dataset", type=Path, help="folder with corpus.jsonl, queries.jsonl, qrels/test.tsv")
    e.add_argument("--pipeline", choices=["bm25", "bm25-reference", "dense", "hybrid", "full"], default="hybrid")
    e.add_argument("--json", action="store_true", help="print one JSON object on the last line of stdout")
    e.add_argument(
        "--cache-dir", type=Path, default=Path("~/.cache/ragraph/eval"),
        help="where dataset indexes are cached, keyed by corpus checksum and settings",
    )
    e.set_defaults(func=_eval)

    c = sub.add_parser("config", help="validate the config; --show prints the effective values")
    c.add_argument("--show", action="store_true", help="print the effective config as YAML")
    c.set_defaults(func=_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
