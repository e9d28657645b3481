"""`ragraph models` for hub and local-folder sources, and the reranker as a provisioned role.

The hub is the one thing these tests cannot reach: :func:`cli.models.hub_download` is replaced by a
fake that writes a small model folder the way ``snapshot_download(local_dir=...)`` does (files plus
its ``.cache`` bookkeeping). Everything else (folders, copies, manifests, checksums, the config's
``location()``) is real. The offline test calls the real ``snapshot_download`` with offline mode on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import cli.models as cm
from cli.models import (
    MANIFEST,
    ModelSourceError,
    provision,
    provision_all,
    read_manifest,
)
from common.config import REPO_ROOT, AppConfig, ModelsConfig, ModelSpec, load_config
from common.manifest import tree_checksums

QWEN = "Qwen/Qwen2.5-7B-Instruct"
QUIET = {"log": lambda _: None}


class FakeHub:
    """Stands in for snapshot_download: writes config.json, weights and tokenizer for a repo id."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, Path]] = []

    def __call__(self, repo_id: str, *, revision: str | None, local_dir: Path) -> None:
        self.calls.append((repo_id, revision, local_dir))
        local_dir.mkdir(parents=True, exist_ok=True)
        (local_dir / "config.json").write_text(json.dumps({"_name_or_path": repo_id, "revision": revision}))
        (local_dir / "model.safetensors").write_bytes(f"weights of {repo_id}@{revision}".encode() * 50)
        (local_dir / "tokenizer.json").write_text("{}")
        (local_dir / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        (local_dir / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag\n")


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    fake = FakeHub()
    monkeypatch.setattr(cm, "hub_download", fake)
    return fake


def models_config(tmp_path: Path, **roles: dict) -> ModelsConfig:
    base = {"embedder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "source": "hub"},
            "generator": {"name": QWEN, "source": "hub"}}
    return ModelsConfig.model_validate({"dir": str(tmp_path / "models"), **base, **roles})


def model_folder(root: Path, payload: bytes = b"w" * 300) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bert"}')
    (root / "model.safetensors").write_bytes(payload)
    (root / "sub").mkdir()
    (root / "sub" / "vocab.txt").write_text("a\nb\n")
    return root


# ---------------------------------------------------------------------------------------------
# hub


def test_hub_model_is_downloaded_into_models_dir_with_a_manifest_and_location_follows(tmp_path, hub):
    models = models_config(tmp_path, generator={"name": QWEN, "source": "hub", "revision": "abc123"})
    assert models.location("generator") == QWEN  # not provisioned yet: the engine would fetch it

    r = provision("generator", models.generator, models.dir, **QUIET)

    folder = models.dir / "Qwen--Qwen2.5-7B-Instruct"
    assert r.status == "provisioned" and r.location == str(folder)
    assert hub.calls == [(QWEN, "abc123", models.dir / ".Qwen--Qwen2.5-7B-Instruct.partial")]
    assert sorted(p.name for p in models.dir.iterdir()) == ["Qwen--Qwen2.5-7B-Instruct"]  # nothing half-written left
    assert not (folder / ".cache").exists()  # the download's bookkeeping is not part of the model
    manifest = read_manifest(folder)
    assert manifest["source"] == "hub" and manifest["source_id"] == QWEN and manifest["source_revision"] == "abc123"
    assert manifest["role"] == "generator" and manifest["checksum"] == r.checksum
    assert manifest["files"] == tree_checksums(folder)
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert "config.json present; 3 files" in r.check

    assert models.provisioned("generator")
    assert models.location("generator") == str(folder)  # the engine gets the folder, never the hub


def test_second_run_verifies_and_downloads_nothing(tmp_path, hub):
    models = models_config(tmp_path)
    first = provision("generator", models.generator, models.dir, **QUIET)
    again = provision("generator", models.generator, models.dir, **QUIET)
    assert len(hub.calls) == 1
    assert again.status == "up to date" and again.checksum == first.checksum
    assert [s.what for s in again.steps] == ["verify checksums"]

    forced = provision("generator", models.generator, models.dir, force=True, **QUIET)
    assert len(hub.calls) == 2 and forced.status == "provisioned" and forced.checksum == first.checksum


def test_a_changed_revision_downloads_again_and_an_old_folder_is_not_used(tmp_path, hub):
    old = models_config(tmp_path, generator={"name": QWEN, "source": "hub", "revision": "v1"})
    provision("generator", old.generator, old.dir, **QUIET)
    new = models_config(tmp_path, generator={"name": QWEN, "source": "hub", "revision": "v2"})
    assert not new.provisioned("generator") and new.location("generator") == QWEN  # v1's folder is not v2

    r = provision("generator", new.generator, new.dir, **QUIET)
    assert r.status == "provisioned" and [c[1] for c in hub.calls] == ["v1", "v2"]
    assert read_manifest(Path(r.location))["source_revision"] == "v2"
    assert new.location("generator") == r.location and not old.provisioned("generator")


def test_a_corrupt_download_is_named_with_the_fix(tmp_path, hub):
    models = models_config(tmp_path)
    r = provision("generator", models.generator, models.dir, **QUIET)
    (Path(r.location) / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelSourceError, match=r"model\.safetensors is corrupt .*fix: ragraph models --force"):
        provision("generator", models.generator, models.dir, **QUIET)


def test_a_download_without_config_json_is_refused(tmp_path, monkeypatch):
    def empty(repo_id, *, revision, local_dir):
        local_dir.mkdir(parents=True)
        (local_dir / "README.md").write_text("a dataset, not a model")

    monkeypatch.setattr(cm, "hub_download", empty)
    models = models_config(tmp_path)
    with pytest.raises(ModelSourceError, match=rf"models.generator \({QWEN}\): .* has no config.json"):
        provision("generator", models.generator, models.dir, **QUIET)
    assert not (models.dir / "Qwen--Qwen2.5-7B-Instruct").exists() and models.location("generator") == QWEN


def test_offline_hub_error_names_the_model_and_what_to_do(tmp_path, monkeypatch):
    # The real snapshot_download, with the hub library in offline mode (as on this machine).
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models = models_config(tmp_path)
    with pytest.raises(ModelSourceError) as e:
        provision("generator", models.generator, models.dir, **QUIET)
    msg = str(e.value)
    assert f"models.generator: cannot download {QWEN} from the model hub" in msg
    assert "HF_HUB_OFFLINE" in msg and "HF_ENDPOINT" in msg and "source 'path'" in msg
    assert not (models.dir / "Qwen--Qwen2.5-7B-Instruct").exists()
    assert models.location("generator") == QWEN


def test_unreachable_hub_error_says_the_download_resumes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    def unreachable(repo_id, *, revision, local_dir):
        local_dir.mkdir(parents=True)
        (local_dir / "config.json").write_text("{}")  # got this far, then the network went
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(cm, "hub_download", unreachable)
    models = models_config(tmp_path)
    with pytest.raises(ModelSourceError, match=rf"downloading {QWEN} from the model hub failed \(ConnectionError.*resumes"):
        provision("generator", models.generator, models.dir, **QUIET)
    assert not models.provisioned("generator")
    assert (models.dir / ".Qwen--Qwen2.5-7B-Instruct.partial" / "config.json").exists()  # kept for the resume


# ---------------------------------------------------------------------------------------------
# local folders


def test_path_inside_models_dir_is_verified_in_place(tmp_path, hub):
    folder = model_folder(tmp_path / "models" / "Qwen2.5-7B-Instruct")
    models = models_config(tmp_path, generator={"name": "Qwen2.5-7B-Instruct", "source": "path", "path": str(folder)})
    assert models.location("generator") == str(folder)

    r = provision("generator", models.generator, models.dir, **QUIET)
    assert r.status == "provisioned" and r.location == str(folder)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["Qwen2.5-7B-Instruct"]  # no copy
    manifest = read_manifest(folder)
    assert manifest["source"] == "path" and manifest["files"] == tree_checksums(folder)
    assert models.provisioned("generator") and models.location("generator") == str(folder)

    again = provision("generator", models.generator, models.dir, **QUIET)
    assert again.status == "up to date" and again.checksum == r.checksum and hub.calls == []

    (folder / "sub" / "vocab.txt").write_text("changed")
    with pytest.raises(ModelSourceError, match=r"vocab.txt is corrupt"):
        provision("generator", models.generator, models.dir, **QUIET)


def test_path_elsewhere_is_copied_once_and_again_when_it_changes(tmp_path, monkeypatch):
    src = model_folder(tmp_path / "usb" / "qwen")
    models = models_config(tmp_path, generator={"name": "qwen", "source": "path", "path": str(src)})
    copies = []
    real_copytree = cm.shutil.copytree
    def spy(source, *a, **k):  # copytree calls itself for sub-folders: count the top-level copies
        if Path(source) == src:
            copies.append(Path(source))
        return real_copytree(source, *a, **k)

    monkeypatch.setattr(cm.shutil, "copytree", spy)

    r = provision("generator", models.generator, models.dir, **QUIET)
    copy = models.dir / "qwen"
    assert r.location == str(copy) and copies == [src]
    assert tree_checksums(copy) == tree_checksums(src) and not (src / MANIFEST).exists()  # the source is not written
    assert models.location("generator") == str(copy)

    assert provision("generator", models.generator, models.dir, **QUIET).status == "up to date" and len(copies) == 1

    (src / "model.safetensors").write_bytes(b"new weights" * 40)
    r3 = provision("generator", models.generator, models.dir, **QUIET)
    assert r3.status == "provisioned" and len(copies) == 2 and r3.checksum != r.checksum
    assert (copy / "model.safetensors").read_bytes() == b"new weights" * 40
    assert sorted(p.name for p in models.dir.iterdir()) == ["qwen"]


def test_path_without_config_json_or_missing_is_refused(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.bin").write_bytes(b"x")
    models = models_config(tmp_path, generator={"name": "bare", "source": "path", "path": str(bare)})
    with pytest.raises(ModelSourceError, match=r"has no config.json"):
        provision("generator", models.generator, models.dir, **QUIET)
    gone = models_config(tmp_path, generator={"name": "gone", "source": "path", "path": str(tmp_path / "gone")})
    with pytest.raises(ModelSourceError, match=r"models.generator.path .*gone is not a folder"):
        provision("generator", gone.generator, gone.dir, **QUIET)


def test_spec_fields_are_checked():
    with pytest.raises(ValueError, match="`revision` is only used with source 'hub'"):
        ModelSpec(name="x", source="path", path="/x", revision="v1")
    with pytest.raises(ValueError, match="must be a plain folder name"):
        ModelSpec(name="../x", source="path", path="/x")
    assert ModelSpec(name=QWEN, source="hub").folder_name == "Qwen--Qwen2.5-7B-Instruct"


# ---------------------------------------------------------------------------------------------
# the reranker as a provisioned role


def app_config(tmp_path: Path, **overrides) -> AppConfig:
    data = yaml.safe_load((REPO_ROOT / "configs" / "local.yaml").read_text())
    data["models"]["dir"] = str(tmp_path / "models")
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return AppConfig.model_validate(data)


def test_reranker_model_string_still_works_without_models_reranker():
    cfg = load_config(REPO_ROOT / "configs" / "local.yaml", environ={})
    assert cfg.models.reranker is None
    assert cfg.reranker_model() == cfg.reranker.model


def test_reranker_resolves_through_models_reranker_once_provisioned(tmp_path, hub):
    cfg = app_config(tmp_path, models={
        "embedder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "source": "hub"},
        "generator": {"name": QWEN, "source": "hub"},
        "reranker": {"name": "cross-encoder/ms-marco-MiniLM-L-6-v2", "source": "hub"},
    })
    assert cfg.reranker_model() == "cross-encoder/ms-marco-MiniLM-L-6-v2"
    from deployments.reranker import CrossEncoderReranker

    reports = provision_all(cfg.models, **QUIET)
    assert [r.role for r in reports] == ["embedder", "generator", "reranker"]
    assert hub.calls[-1][0] == "cross-encoder/ms-marco-MiniLM-L-6-v2" and len(hub.calls) == 3
    folder = str(cfg.models.dir / "cross-encoder--ms-marco-MiniLM-L-6-v2")
    assert cfg.reranker_model() == folder
    assert CrossEncoderReranker.from_config(cfg).model == folder


def test_reranker_model_and_models_reranker_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"both models.reranker .* and reranker.model .* are set; keep one"):
        app_config(tmp_path, models={"reranker": {"name": "ce", "source": "path", "path": str(tmp_path)}},
                   reranker={"model": "/elsewhere/ce"})


def test_gpu_config_round_trips_with_a_provisioned_reranker():
    cfg = load_config(REPO_ROOT / "configs" / "gpu.yaml", environ={})
    assert AppConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg


# ---------------------------------------------------------------------------------------------
# the command and the cluster


def test_cli_downloads_hub_models_then_reports_them_up_to_date(tmp_path, hub, monkeypatch, capsys):
    from cli.main import main

    cfg_file = tmp_path / "hub.yaml"
    cfg_file.write_text(yaml.safe_dump({"models": {
        "dir": str(tmp_path / "models"),
        "embedder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "source": "hub"},
        "generator": {"name": QWEN, "source": "hub"},
        "reranker": {"name": "cross-encoder/ms-marco-MiniLM-L-6-v2", "source": "hub"},
    }}))
    for var in [v for v in os.environ if v.startswith("RAGRAPH")]:
        monkeypatch.delenv(var)
    assert main(["--config", str(cfg_file), "models"]) == 0
    out = capsys.readouterr().out
    assert out.count(" provisioned ") == 3 and str(tmp_path / "models" / "Qwen--Qwen2.5-7B-Instruct") in out
    assert main(["--config", str(cfg_file), "models"]) == 0
    assert capsys.readouterr().out.count("up to date") == 3 and len(hub.calls) == 3


def test_cli_offline_error_exits_1_naming_the_model(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from cli.main import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg_file = tmp_path / "hub.yaml"
    cfg_file.write_text(yaml.safe_dump({"models": {
        "dir": str(tmp_path / "models"),
        "embedder": {"name": "sentence-transformers/all-MiniLM-L6-v2", "source": "hub"},
        "generator": {"name": QWEN, "source": "hub"},
    }}))
    assert main(["--config", str(cfg_file), "models"]) == 1
    err = capsys.readouterr().err
    assert "error: models.embedder: cannot download sentence-transformers/all-MiniLM-L6-v2" in err


def test_kuberay_head_runs_ragraph_models_before_ray_starts():
    from cli import kuberay

    cfg = load_config(REPO_ROOT / "configs" / "gpu.yaml", environ={})
    head = kuberay.rayservice(cfg, image="img")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    (init,) = head["initContainers"]
    assert init["command"] == ["ragraph", "--config", "/home/ray/ragraph/configs/gpu.yaml", "models"]
    assert init["image"] == "img"
    assert {"name": "shared", "mountPath": "/mnt/shared"} in init["volumeMounts"]
    assert str(cfg.models.dir).startswith("/mnt/shared/")  # the models land where every pod reads them
    workers = kuberay.rayservice(cfg, image="img")["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert all("initContainers" not in w["template"]["spec"] for w in workers)  # one download, on the head
