"""Saved models as a Hugging Face user reaches for them: ``from_pretrained("user/repo")`` read
from a hub cache (offline, laid out as huggingface_hub lays out its own), and a model card
whose YAML metadata ``ModelCard.load`` reads back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, scan_cache_dir, try_to_load_from_cache

from spt import HeadConfig, PromptConfig, SparsePromptModel, UserError, build_head, load_backbone
from spt.serialization import CONFIG_FILE, write_model_card

LABELS = ["0", "1"]
TEXTS = ["a great film , really fun .", "the worst movie , so boring and dull"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's folder is named by a 40-hex commit


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never asked: only the cache is read
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def make_sparse(model_dir: Path, seed: int = 0) -> SparsePromptModel:
    """A tiny sparse model whose trainable tensors are all random (no zero-initialised part)."""
    torch.manual_seed(seed)
    backbone = load_backbone(str(model_dir))
    head_config = HeadConfig(dropout=0.0)
    model = SparsePromptModel(backbone, PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=0.0),
                              build_head(backbone, head_config, LABELS), head_config, LABELS, [1, 3], max_length=32)
    with torch.no_grad():
        for tensor in model.trainable_state_dict().values():
            tensor.copy_(torch.randn_like(tensor) * 0.5)
    return model.eval()


def mirror_into_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT) -> Path:
    """``folder``'s files as the hub cache holds a downloaded repo: content-addressed blobs, a
    snapshot of links named by commit, and ``refs/main`` naming that commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _probabilities(results: list[dict]) -> list[float]:
    return [p for r in results for p in r["probabilities"].values()]


def test_a_hub_repo_in_the_cache_loads_as_the_saved_model(tiny_bert, tmp_path, monkeypatch):
    original = make_sparse(tiny_bert)
    saved = original.save_pretrained(tmp_path / "saved")
    cache = tmp_path / "hub"
    mirror_into_hub_cache(saved, cache, "user/repo")
    # the layout is the one huggingface_hub itself reads
    assert try_to_load_from_cache("user/repo", CONFIG_FILE, cache_dir=cache) == str(cache / "models--user--repo" / "snapshots" / COMMIT / CONFIG_FILE)
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == ["user/repo"]

    loaded = SparsePromptModel.from_pretrained("user/repo", backbone=str(tiny_bert), cache_dir=cache)
    assert not loaded.training and loaded.layers == [1, 3]
    expected = original.trainable_state_dict()
    got = loaded.trainable_state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert _probabilities(loaded.predict(TEXTS)) == pytest.approx(_probabilities(original.predict(TEXTS)), abs=1e-6)
    # a revision by commit reads the same snapshot
    by_commit = SparsePromptModel.from_pretrained("user/repo", backbone=str(tiny_bert), cache_dir=cache, revision=COMMIT)
    assert torch.equal(by_commit.trainable_state_dict()["head.classifier.weight"], expected["head.classifier.weight"])

    # a local folder of that name comes first
    monkeypatch.chdir(tmp_path)
    make_sparse(tiny_bert, seed=1).save_pretrained(tmp_path / "user" / "repo")
    local = SparsePromptModel.from_pretrained("user/repo", cache_dir=cache)
    assert not torch.equal(local.trainable_state_dict()["head.classifier.weight"], expected["head.classifier.weight"])


def test_a_hub_model_trained_on_a_local_backbone_folder_asks_for_backbone(tiny_bert, tmp_path):
    saved = make_sparse(tiny_bert).save_pretrained(tmp_path / "saved")
    assert json.loads((saved / CONFIG_FILE).read_text())["backbone"].startswith("..")  # a folder, relative
    mirror_into_hub_cache(saved, tmp_path / "hub", "user/repo")
    with pytest.raises(UserError, match=r"^model.backbone: the hub repo user/repo was trained on a local backbone folder "
                       r".*not part of the repo; pass the backbone: from_pretrained\(\.\.\., backbone=NAME_OR_FOLDER\)"):
        SparsePromptModel.from_pretrained("user/repo", cache_dir=tmp_path / "hub")


@pytest.mark.parametrize("name,message", [
    ("user/missing", r"^model: no folder 'user/missing' here, and the hub repo user/missing cannot be fetched "
                     r"\(LocalEntryNotFoundError: .*\); check the folder or repo id, pass token= for a private repo"),
    ("runs/sst2-k2/sparse", r"^model: no folder 'runs/sst2-k2/sparse' here, and it is not a hub repo id \(user/name\)"),
    ("./sparse", r"^model: no folder './sparse' here, and it is not a hub repo id"),
    ("no such model", r"^model: no folder 'no such model' here, and it is not a hub repo id"),
    ("minilm-l6", r"^model: no folder 'minilm-l6' here, and it is not a hub repo id"),  # a backbone alias: no download
])
def test_a_model_that_is_neither_here_nor_in_the_cache_is_one_clear_error(tmp_path, name, message):
    with pytest.raises(UserError, match=message):
        SparsePromptModel.from_pretrained(name, cache_dir=tmp_path / "empty-cache")


def test_a_revision_the_cache_does_not_hold_is_named(tiny_bert, tmp_path):
    mirror_into_hub_cache(make_sparse(tiny_bert).save_pretrained(tmp_path / "saved"), tmp_path / "hub", "user/repo")
    with pytest.raises(UserError, match=r"^model: .*the hub repo user/repo at revision 'v2' cannot be fetched"):
        SparsePromptModel.from_pretrained("user/repo", backbone=str(tiny_bert), cache_dir=tmp_path / "hub", revision="v2")


def test_the_model_card_carries_hub_metadata_and_the_usage(tiny_bert, tmp_path):
    metrics = {"task": "sst2", "metric": "accuracy", "dev": {"accuracy": 0.8125}, "test": {"accuracy": 0.75}}
    saved = make_sparse(tiny_bert).save_pretrained(tmp_path / "saved", metrics)
    card = ModelCard.load(saved / "README.md")
    assert card.data.library_name == "spt-search" and card.data.pipeline_tag == "text-classification"
    assert {"selective-prompt-tuning", "prompt-tuning", "bert"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local backbone folder is no hub model
    assert card.data.metrics == ["accuracy"]
    assert [(r.dataset_name, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("sst2", "validation", "accuracy", 0.8125), ("sst2", "test", "accuracy", 0.75)]
    assert "| test accuracy | 0.7500 |" in card.text and "| prompt layers | 1, 3 |" in card.text
    assert f'from_pretrained("{saved}", backbone=' in card.text

    # a backbone named by alias or hub id is the card's base_model; the usage loads from the repo
    config = json.loads((saved / CONFIG_FILE).read_text())
    for reference, base in (("minilm-l6", "sentence-transformers/all-MiniLM-L6-v2"), ("org/tiny-bert", "org/tiny-bert")):
        (saved / CONFIG_FILE).write_text(json.dumps({**config, "backbone": reference}))
        card = ModelCard.load(write_model_card(saved, repo_id="user/repo"))
        assert card.data.base_model == base and card.data.eval_results is None
        assert 'from_pretrained("user/repo")\n' in card.text


def test_push_to_hub_prepares_a_card_that_loads_from_the_repo(tiny_bert):
    folder = make_sparse(tiny_bert).push_to_hub("user/repo", upload=False)
    try:
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "spt-search"
        assert 'from_pretrained("user/repo", backbone=' in card.text  # its backbone folder does not travel with it
    finally:
        shutil.rmtree(folder.parent)  # the temporary folder push_to_hub made
