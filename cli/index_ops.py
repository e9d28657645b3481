"""``ragraph index versions`` and ``ragraph index rollback VERSION``: the index versions kept in
``indexing.dir`` (or ``--index-dir``), and a rollback to one of them, as atomic as a publish and
refused for a version embedded by another model than the config's (the same checks as
``POST /v1/index/rollback``; the retrievers pick the version up within ``retriever.reload_interval_s``)."""

from __future__ import annotations

import argparse
import json
import sys


def index_op(cfg, args: argparse.Namespace) -> int:
    from indexing.jobs import settings_from_config
    from indexing.store import IndexBuildError, RollbackError, list_versions, rollback, same_embedder

    root = (args.index_dir or cfg.indexing.dir).expanduser()
    op = str(args.source)
    if op == "versions":
        if args.version is not None:
            print(f"error: `ragraph index versions` takes no argument (got {args.version!r})", file=sys.stderr)
            return 2
        live, versions = list_versions(root)
        settings = settings_from_config(cfg)
        if args.json:
            print(json.dumps({"live": live, "versions": versions}))
            return 0
        if not versions:
            print(f"no index version in {root}; run `ragraph index`")
            return 0
        print(f"index versions in {root} (live: {live or 'none'}; kept: indexing.keep_versions = "
              f"{cfg.indexing.keep_versions})")
        print(f"  {'':1} {'version':<26} {'created':<25} {'documents':>9} {'chunks':>7}  embedder")
        for v in versions:
            if "error" in v:
                print(f"  {'*' if v['live'] else ' '} {v['name']:<26} unreadable: {v['error']}")
                continue
            same = "same as the config" if same_embedder(v, settings) else "OTHER (rollback refused)"
            print(f"  {'*' if v['live'] else ' '} {v['name']:<26} {v['created_at']:<25} {v['documents']:>9} "
                  f"{v['chunks']:>7}  {same}")
        return 0
    if args.version is None:
        print("error: `ragraph index rollback VERSION` needs the version (`ragraph index versions` lists them)",
              file=sys.stderr)
        return 2
    try:
        previous, live = rollback(root, args.version, settings_from_config(cfg))
    except (RollbackError, IndexBuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if previous == live:
        print(f"{live} is already live; nothing changed")
    else:
        print(f"rolled back: {live} is live (was {previous or 'none'}); retrievers switch within "
              f"retriever.reload_interval_s = {cfg.retriever.reload_interval_s:g} s")
    if args.json:
        print(json.dumps({"previous": previous, "live": live}))
    return 0
