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

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
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
