"""The ``ragraph`` command. Each subcommand is added when it works."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from common.config import ConfigError, dump_config, load_config


def _models(args: argparse.Namespace) -> int:
    # Imported here so `ragraph config` does not pay for it.
    from cli.models import ModelSourceError, broken_cuda_packages, provision_all

    cfg = load_config(args.config)
    models = cfg.models
    specs = [s for s in (models.embedder, models.generator, models.reranker) if s is not None]
    if not any(s.source == "hub" for s in specs):
        _offline()  # hub models need the hub; HF_HUB_OFFLINE=1 set by hand still turns it off (a clear error)
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


def _db(args: argparse.Namespace) -> int:
    from state.db import Database, StateError, describe, head_revision, url_of

    cfg = load_config(args.config)
    url = url_of(cfg)
    try:
        db = Database(url, connect_timeout_s=cfg.state.connect_timeout_s)
        try:
            if args.db_command == "upgrade":
                before, after = db.upgrade()
                print(f"{describe(url)}: already at schema {after}" if before == after
                      else f"{describe(url)}: upgraded from schema {before or '(none)'} to {after}")
            else:
                print(f"{describe(url)}: schema {db.revision() or '(none)'}; the code's head is {head_revision()}")
        finally:
            db.close()
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _backup(args: argparse.Namespace) -> int:
    from state.backup import backup
    from state.db import StateError

    cfg = load_config(args.config)
    print(f"ragraph backup: {args.dir}", file=sys.stderr)
    try:
        r = backup(cfg, args.dir, log=lambda m: print(f"  {m}", file=sys.stderr))
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    index = r["index"]["version"] if r["index"] else "none"
    print(f"backed up schema {r['state']['revision'] or '(none)'} ({r['state']['kind']}) and index {index}: "
          f"{len(r['files'])} files, {r['bytes']} bytes in {r['seconds']:.2f} s -> {r['dir']}")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from state.backup import restore
    from state.db import StateError

    cfg = load_config(args.config)
    print(f"ragraph restore: {args.dir}{' (--force)' if args.force else ''}", file=sys.stderr)
    try:
        r = restore(cfg, args.dir, force=args.force, log=lambda m: print(f"  {m}", file=sys.stderr))
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = r["state"]
    index = r["index"]["version"] if r["index"] else "none (the backup holds no index)"
    print(f"restored {s['target']} (schema {s['upgraded_to'] or s['revision'] or '(none)'}) and index {index}: "
          f"{r['files']} files, {r['bytes']} bytes in {r['seconds']:.2f} s")
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
    if args.source is not None and str(args.source) in ("versions", "rollback"):  # `./versions` for a folder
        from cli.index_ops import index_op

        return index_op(cfg, args)
    if args.version is not None:
        print(f"error: `ragraph index` takes one SOURCE; got also {args.version!r}", file=sys.stderr)
        return 2
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
    if args.json:
        import dataclasses
        import json

        print(json.dumps(dataclasses.asdict(report)))
    return 0


def _dataset_retriever(cfg, dataset: Path, cache_dir: Path, log):
    """A warmed-up retriever over ``dataset``, indexed into a cache keyed by its checksum."""
    from deployments.retriever import HybridRetriever
    from indexing.evaluate import dataset_key
    from indexing.jobs import index_source, settings_from_config

    root = cache_dir.expanduser() / dataset_key(dataset, settings_from_config(cfg))
    log(index_source(cfg, dataset, root, log=log).summary())
    retriever = HybridRetriever.from_config(cfg, index_dir=root)
    retriever.warm_up()
    return retriever


def _adapt(args: argparse.Namespace) -> int:
    import json

    from indexing.adapt import mine_pairs, train_cross_encoder

    _offline()
    cfg = load_config(args.config)
    out = (args.out or Path(cfg.reranker.model)).expanduser()
    t0 = time.perf_counter()
    if args.corpus is not None:
        retriever = _dataset_retriever(cfg, args.corpus, args.cache_dir, print)
    else:
        from deployments.retriever import HybridRetriever

        retriever = HybridRetriever.from_config(cfg)
        retriever.warm_up()
    print(f"ragraph reranker adapt: mining {args.queries} pseudo-queries from index {retriever.version}")
    pairs = mine_pairs(retriever, n_queries=args.queries, negatives=args.negatives, seed=args.seed)
    mined = time.perf_counter() - t0
    print(f"  {len(pairs)} pairs in {mined:.0f} s; training from {cfg.models.location('embedder')}")
    stats = train_cross_encoder(cfg.models.location("embedder"), pairs, out, max_minutes=args.max_minutes - mined / 60)
    stats = {"pairs": len(pairs), "mining_seconds": round(mined, 1), **stats,
             "total_seconds": round(time.perf_counter() - t0, 1), "out": str(out)}
    (out / "ragraph-adapt.json").write_text(json.dumps(stats, indent=2))
    print(f"wrote {out} in {stats['total_seconds']:.0f} s; enable with reranker.enabled: true and reranker.model: {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from indexing.evaluate import DatasetError, evaluate, load_beir

    _offline()
    cfg = load_config(args.config)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        queries, qrels = load_beir(args.dataset)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    retriever = _dataset_retriever(cfg, args.dataset, args.cache_dir, log)
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


def _serve(args: argparse.Namespace) -> int:
    _offline()
    cfg = load_config(args.config)
    if args.host or args.port:
        http = cfg.http.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
        cfg = cfg.model_copy(update={"http": http})
    from serve.launch import LaunchError, check_exposure

    try:
        cfg = check_exposure(cfg, insecure=args.insecure)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.export is not None:
        from serve.launch import export_serve_config

        args.export.write_text(export_serve_config(cfg))
        print(f"wrote {args.export}; deploy it with: serve deploy {args.export}")
        return 0
    from serve.launch import LaunchError, RayGoneError, launch

    try:
        return launch(cfg, address=args.address, verbose=args.verbose, block=not args.no_block)
    except RayGoneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # Ray's exit handlers would wait for the GCS that is gone
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _chat(args: argparse.Namespace) -> int:
    from cli.client import ChatClientError, chat

    try:
        return chat(
            args.question, url=args.url, model=args.model, stream=args.stream, rag=not args.no_rag, top_k=args.top_k,
            strategy=args.strategy, domains=args.domain, max_tokens=args.max_tokens, show_json=args.json,
        )
    except ChatClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _keys(args: argparse.Namespace) -> int:
    from state.db import Database, StateError, describe, sqlite_url, url_of
    from state.keys import AuthError, SqlKeys

    cfg = load_config(args.config)
    url = sqlite_url(args.db) if args.db else url_of(cfg)
    db = describe(url)
    try:
        database = Database(url, connect_timeout_s=cfg.state.connect_timeout_s)
        if cfg.state.migrate == "auto" or args.db:
            database.upgrade()
    except StateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    store = SqlKeys(database)
    try:
        if args.keys_command == "create":
            token, key = store.create(
                args.name, args.scope, chat_per_min=args.chat_per_min, search_per_min=args.search_per_min,
                other_per_min=args.other_per_min, daily_tokens=args.daily_tokens, monthly_tokens=args.monthly_tokens,
                daily_budget=args.daily_budget,
            )
            if args.json:
                print(json.dumps({**key.public(), "key": token}))
            else:
                print(f"created key {key.id} ({key.name}, scope {key.scope}) in {db}")
                print(f"  {token}")
                print("  this is the only time the key is shown; it is stored hashed")
                if not cfg.governor.auth.enabled:
                    print("  note: auth is off in this config (governor.auth.enabled: false); keys are not checked")
        elif args.keys_command == "list":
            keys = store.list(include_revoked=args.all)
            if args.json:
                print(json.dumps([k.public() for k in keys]))
            elif not keys:
                print(f"no {'' if args.all else 'active '}keys in {db}; `ragraph keys create NAME` makes one")
            else:
                for k in keys:
                    state = "revoked" if k.revoked else "active"
                    print(f"{k.id}  {k.scope:<7}  {state:<7}  {k.name}")
        else:
            key = store.revoke(args.id)
            print(json.dumps(key.public()) if args.json else f"revoked key {key.id} ({key.name}); it is refused from now on")
    except (AuthError, StateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        database.close()
    return 0


def _kuberay(args: argparse.Namespace) -> int:
    import difflib

    from common.config import DEFAULT_CONFIG, ENV_CONFIG
    from cli.kuberay import KubeRayError, command, display_path, render

    if args.check and args.out is None:
        print("error: --check compares against a file: give it with --out FILE", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    source = display_path(args.config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    out = display_path(args.out) if args.out is not None else None
    opts = {"name": args.name, "namespace": args.namespace, "image": args.image}
    try:
        text = render(cfg, source=source, **opts)
    except KubeRayError as e:
        print(f"error: {source}: {e}", file=sys.stderr)
        return 1
    if args.out is None:
        sys.stdout.write(text)
        return 0
    if args.check:
        old = args.out.read_text() if args.out.is_file() else ""
        if old == text:
            print(f"{args.out} is up to date with {source}")
            return 0
        diff = list(difflib.unified_diff(old.splitlines(), text.splitlines(), str(args.out), "generated", lineterm=""))
        changed = sum(1 for d in diff if d[:1] in "+-" and d[:3] not in ("+++", "---"))
        shown = diff[:40] + ([f"... {len(diff) - 40} more diff lines"] if len(diff) > 40 else [])
        print("\n".join(shown), file=sys.stderr)
        print(f"{args.out} differs from what {source} generates ({changed} lines changed"
              f"{'' if old else '; the file is missing'}); regenerate with: "
              f"{command(source=source, out=out, **opts)}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} from {source}; apply it with: kubectl apply -f {args.out}")
    return 0


def _eval_answers(args: argparse.Namespace) -> int:
    from cli.eval_answers import main as eval_answers

    return eval_answers(args)


def _loadtest_args(p: argparse.ArgumentParser) -> None:
    from load_tests.cli import add_arguments

    add_arguments(p)


def _loadtest(args: argparse.Namespace) -> int:
    from load_tests.cli import main as loadtest

    return loadtest(args)


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
    i.add_argument("source", type=Path, nargs="?", default=None,
                   help="what to index (default: indexing.source); or `versions` (list the kept versions) or "
                   "`rollback VERSION` (make a kept version live)")
    i.add_argument("version", nargs="?", default=None, help=argparse.SUPPRESS)  # of `ragraph index rollback VERSION`
    i.add_argument("--full", action="store_true", help="re-embed everything, reusing no vector")
    i.add_argument("--index-dir", type=Path, default=None, help="index root (default: indexing.dir)")
    i.add_argument("--json", action="store_true", help="print the build report as one JSON object on the last line")
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

    ea = sub.add_parser("eval-answers", help="score a running service's answers on a QA set (docs/evaluation.md)")
    from cli.eval_answers import add_arguments as _ea_args

    _ea_args(ea)
    ea.set_defaults(func=_eval_answers)

    r = sub.add_parser("reranker", help="reranker tools")
    rsub = r.add_subparsers(dest="reranker_command", required=True, metavar="COMMAND")
    a = rsub.add_parser("adapt", help="train a cross-encoder from the packaged MiniLM on pseudo-labelled corpus pairs")
    a.add_argument("--corpus", type=Path, default=None, help="a BEIR folder to mine (default: the live index)")
    a.add_argument("--out", type=Path, default=None, help="output folder (default: reranker.model)")
    a.add_argument("--queries", type=int, default=1500, help="pseudo-queries to mine")
    a.add_argument("--negatives", type=int, default=3, help="hard negatives per pseudo-query")
    a.add_argument("--max-minutes", type=float, default=14.0, help="time budget, mining included")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--cache-dir", type=Path, default=Path("~/.cache/ragraph/eval"))
    a.set_defaults(func=_adapt)

    s = sub.add_parser("serve", help="start the serving graph (local Ray, or --address auto) and wait until ready")
    s.add_argument("--address", default=None, help="a running Ray cluster ('auto'); default: start a local one")
    s.add_argument("--host", default=None, help="bind address (default: http.host, 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="port (default: http.port, 8000)")
    s.add_argument("--export", type=Path, default=None, metavar="FILE",
                   help="write a Serve config for `serve deploy` and exit")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host with auth off (anyone who reaches the port may use the service)")
    s.add_argument("--no-block", action="store_true", help="return once ready (the app stays up only on a cluster)")
    s.add_argument("--verbose", action="store_true", help="stream every replica's log lines to the terminal")
    s.set_defaults(func=_serve)

    ch = sub.add_parser("chat", help="ask the running service a question; prints the answer and its sources")
    ch.add_argument("question")
    ch.add_argument("--url", default="http://127.0.0.1:8000", help="service URL")
    ch.add_argument("--model", default=None, help="model name (default: the first of GET /v1/models)")
    ch.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    ch.add_argument("--no-rag", action="store_true", help="plain chat, no retrieval")
    ch.add_argument("--top-k", type=int, default=None)
    ch.add_argument("--strategy", choices=["hybrid", "lexical", "semantic"], default=None)
    ch.add_argument("--domain", action="append", default=None, help="filter to a domain (repeatable)")
    ch.add_argument("--max-tokens", type=int, default=None)
    ch.add_argument("--json", action="store_true", help="print the raw JSON response")
    ch.set_defaults(func=_chat)

    k = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed in the state database)")
    k.add_argument("--db", type=Path, default=None,
                   help="a SQLite state file to use (default: the config's state.url, else its governor.db)")
    ksub = k.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    kc = ksub.add_parser("create", help="make a key; prints it once")
    kc.add_argument("name", help="who or what the key is for")
    kc.add_argument("--scope", choices=["user", "admin", "metrics"], default="user",
                    help="admin may also read every key's usage and clear the response cache; metrics may read "
                    "/metrics and nothing else (a Prometheus scrape key)")
    for kind in ("chat", "search", "other"):
        kc.add_argument(f"--{kind}-per-min", type=float, default=None, help=f"this key's {kind} rate limit (default: config)")
    kc.add_argument("--daily-tokens", type=int, default=None, help="this key's daily token quota (default: config)")
    kc.add_argument("--monthly-tokens", type=int, default=None, help="this key's monthly token quota (default: config)")
    kc.add_argument("--daily-budget", type=float, default=None,
                    help="this key's daily spend limit in governor.pricing's currency (default: governor.quotas.daily_budget)")
    kl = ksub.add_parser("list", help="list keys (never their secrets)")
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kr = ksub.add_parser("revoke", help="revoke a key by its id (the part after rg- and before the dot)")
    kr.add_argument("id")
    for sp in (kc, kl, kr):
        sp.add_argument("--json", action="store_true", help="machine-readable output")
    k.set_defaults(func=_keys)

    lt = sub.add_parser(
        "loadtest", help="load-test a running service (open/closed loop, sweep); writes report.json, report.md, plots",
        description="Drive a running service and measure it (docs: load_tests/README.md).",
    )
    _loadtest_args(lt)
    lt.set_defaults(func=_loadtest)

    d = sub.add_parser("db", help="the state database's schema: upgrade it (Alembic migrations) or show its revision")
    dsub = d.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    dsub.add_parser("upgrade", help="create or upgrade the schema to the code's head (safe to run again)")
    dsub.add_parser("revision", help="the schema's revision and the code's head")
    d.set_defaults(func=_db)

    bk = sub.add_parser("backup", help="back up the state database and the live index version into a new folder")
    bk.add_argument("dir", type=Path, metavar="DIR", help="where to write it (must not exist, or be empty)")
    bk.set_defaults(func=_backup)

    rs = sub.add_parser("restore", help="restore a backup into the config's state database and index folder "
                        "(stop the service first)")
    rs.add_argument("dir", type=Path, metavar="DIR", help="a folder `ragraph backup` wrote")
    rs.add_argument("--force", action="store_true",
                    help="replace a target that holds API keys, usage or a live index version")
    rs.set_defaults(func=_restore)

    kube = sub.add_parser("kuberay", help="write the KubeRay RayService manifest for the config (--check: compare)")
    kube.add_argument("--out", type=Path, default=None, metavar="FILE", help="write here (default: print it)")
    kube.add_argument("--name", default="ragraph", help="the RayService's name (its Service: NAME-serve-svc)")
    kube.add_argument("--namespace", default=None, help="metadata.namespace (default: none, kubectl's namespace)")
    kube.add_argument("--image", default=None,
                      help="the app image for every pod (default: ghcr.io/OWNER/ragraph:VERSION; see configs/kuberay)")
    kube.add_argument("--check", action="store_true", help="exit 1 with a diff summary if FILE differs from the output")
    kube.set_defaults(func=_kuberay)

    c = sub.add_parser("config", help="validate the config; --show prints the effective values")
    c.add_argument("--show", action="store_true", help="print the effective config as YAML")
    c.set_defaults(func=_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
