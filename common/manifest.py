"""Checksums and manifests: the sha256 of every file of a model or index folder, and the manifest that records them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

MANIFEST = "ragraph-model.json"
MANIFEST_VERSION = 1


class ModelSourceError(RuntimeError):
    """A source package is missing or a file is corrupt. The message says how to fix it."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except the manifest, keyed by relative path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def combined_checksum(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelSourceError(f"{folder / MANIFEST} is not valid JSON ({e}); fix: ragraph models --force") from None


def first_bad_file(folder: Path, files: dict[str, str]) -> tuple[Path, Literal["missing", "corrupt"]] | None:
    """The first file of ``files`` (relative path -> sha256) that is missing or differs, if any."""
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            return p, "missing"
        if sha256_file(p) != digest:
            return p, "corrupt"
    return None


def verify_folder(folder: Path, manifest: dict) -> None:
    """Check every file against the manifest; raise naming the first bad one."""
    bad = first_bad_file(folder, manifest.get("files", {}))
    if bad is None:
        return
    p, problem = bad
    if problem == "missing":
        raise ModelSourceError(f"model file {p} is missing; fix: ragraph models --force")
    raise ModelSourceError(
        f"model file {p} is corrupt (sha256 differs from {folder / MANIFEST}); fix: ragraph models --force"
    )
