"""Decoder backbones (GPT-2, LLaMA, Qwen2): closed gates = the frozen model, padding on either
side, the prompted forward against an independent implementation of the causal equations,
the causal-LM verbalizer, a whole run, and save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SENTENCES, encode
from helpers import tiny_config
from test_method import _generator
from torch import nn

from search.cli import main
from search.config import load_config
from search.data import Example
from search.evaluator import Evaluator
from search.feed import Feed
from search.pipeline import prepare
from spt import (
    ConfigError,
    HeadConfig,
    PromptConfig,
    PromptSupernet,
    build_head,
    load_backbone,
    load_prompt_model,
    save_prompt_model,
)
from spt.inputs import EncodedSplit, collate, encode_split
from spt.model import make_plan, run_prompted_layers

LABELS = ["0", "1"]
CLM = {"type": "clm", "template": "{text_a} it was {mask} .", "label_words": {"0": "bad", "1": "good"}}


def decoder_supernet(model_dir, head: dict | None = None, dtype=torch.float32, seed=0, **prompt) -> PromptSupernet:
    torch.manual_seed(seed)
    head_cfg = HeadConfig(dropout=0.0, **(head or {}))
    backbone = load_backbone(str(model_dir), with_lm_head=head_cfg.verbalizer, dtype=dtype)
    prompt.setdefault("normalize", False)  # the equations without the supernet's prompt rescaling
    cfg = PromptConfig(length=prompt.pop("length", 3), bottleneck=8, phm_n=2, dropout=0.0, **prompt)
    return PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS).to(dtype).eval()


def padded(tokenizer, texts, side: str) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = side
    try:
        return encode(tokenizer, texts)
    finally:
        tokenizer.padding_side = "right"


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_closed_gates_give_the_frozen_decoder_output(tiny_decoders, family):
    from transformers import AutoModel

    net = decoder_supernet(tiny_decoders[family])
    batch = encode(net.backbone.tokenizer, SENTENCES)
    assert not batch["attention_mask"].all()  # right padding in the batch
    reference = AutoModel.from_pretrained(tiny_decoders[family]).eval()
    L = net.backbone.num_layers
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        plan = make_plan(L, net.layers, [(False,) * 4] * L, hard=False, discard=1.0)
        states = run_prompted_layers(net.backbone, batch, net.generators, plan, net.gates(), 3, 1.0)
        out = net(batch, arch_mask=torch.zeros(L))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(states[real], expected[real], atol=1e-5, rtol=0)
    last = batch["attention_mask"].sum(1) - 1
    torch.testing.assert_close(out.representation, expected[torch.arange(4), last], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_and_right_padding_give_the_prediction_of_each_sentence_alone(tiny_decoders, family):
    net = decoder_supernet(tiny_decoders[family])
    tok = net.backbone.tokenizer
    with torch.no_grad():
        right = net(padded(tok, SENTENCES, "right"))
        left = net(padded(tok, SENTENCES, "left"))
        alone = torch.cat([net(encode(tok, [s])).logits for s in SENTENCES])
        closed = net(padded(tok, SENTENCES, "left"), arch_mask=torch.zeros(4))
    torch.testing.assert_close(left.logits, right.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(right.logits, alone, atol=1e-5, rtol=0)
    assert not torch.allclose(closed.logits, right.logits, atol=1e-4)  # the prompts do act


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_values_only_decoder_layer_equals_the_full_layer(tiny_decoders, family):
    backbone = load_backbone(str(tiny_decoders[family]))
    batch = encode(backbone.tokenizer, SENTENCES)
    torch.manual_seed(0)
    B = batch["input_ids"].shape[0]
    with torch.no_grad():
        hidden = backbone.embed(batch["input_ids"], None, batch["attention_mask"])
        sequence = torch.cat([torch.randn(B, 3, hidden.shape[-1]), hidden], dim=1)
        key_mask = torch.cat([torch.ones(B, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
        context = backbone.layer_context(sequence, key_mask, prefix=3)
        real = batch["attention_mask"].bool()
        for i in range(backbone.num_layers):
            full = backbone.run_layer(i, sequence, context)[:, 3:]
            partial = backbone.run_layer(i, sequence, context, queries_from=3)
            torch.testing.assert_close(partial[real], full[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- an independent forward (LLaMA)


def _rms(norm, x):
    """RMSNorm computed in float32, as Hugging Face's LLaMA computes it whatever the model's dtype."""
    x32 = x.float()
    return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)


def _rope(x, positions, theta, dim):
    """Rotate-half RoPE of ``(h, S, dim)`` at integer ``positions`` (S,), angles in float32 (as HF)."""
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    angles = torch.cat([positions[:, None].float() * inv[None, :]] * 2, -1)
    return x * angles.cos().to(x.dtype) + torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1) * angles.sin().to(x.dtype)


def _llama_layer(layer, x, n_slots, config, shift):
    """One LLaMA layer on one example ``x`` (S, d) = [slots; tokens] written out: tokens at positions
    0..n-1 and slot k at k - l (``shift = l``: slots at 0..l-1 and the text shifted past them);
    tokens attend causally and to every slot, slots to slots only."""
    S, heads, kv = x.shape[0], config.num_attention_heads, config.num_key_value_heads
    dim = config.hidden_size // heads
    att = layer.self_attn
    h = _rms(layer.input_layernorm, x)
    q = att.q_proj(h).view(S, heads, dim).transpose(0, 1)
    k = att.k_proj(h).view(S, kv, dim).transpose(0, 1).repeat_interleave(heads // kv, 0)
    v = att.v_proj(h).view(S, kv, dim).transpose(0, 1).repeat_interleave(heads // kv, 0)
    index = torch.arange(S)
    theta = config.rope_parameters["rope_theta"]
    q, k = (_rope(t, index - n_slots + shift, theta, dim) for t in (q, k))
    allowed = (index[None, :] <= index[:, None]) | (index[None, :] < n_slots)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dim)).masked_fill(~allowed, float("-inf"))
    x = x + att.o_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(S, -1))
    h = _rms(layer.post_attention_layernorm, x)
    return x + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))


def _reference_last_states(net: PromptSupernet, batch, arch_mask: list[float], shift: bool = False) -> torch.Tensor:
    """``P_i = (1 - lambda g_i) P_hat_i + g_i G_i(H_i)`` per example, each on its real tokens alone."""
    backbone, n_slots, lam = net.backbone, net.prompt_config.length, float(net.prompt_config.discard)
    alpha = torch.sigmoid(net.gates.logits)
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][b, batch["attention_mask"][b].bool()]
        H = backbone.base.embed_tokens(ids)
        P, started = torch.zeros(n_slots, H.shape[-1], dtype=H.dtype), False
        for i, layer in enumerate(backbone.layers):
            if i in net.layers and arch_mask[net.layers.index(i)]:
                g = alpha[net.layers.index(i)]
                fresh = _generator(net, net.layers.index(i), H[None], torch.ones(1, len(ids)), n_slots)[0]
                P, started = (1 - lam * g) * P + g * fresh, True
            slots = n_slots if started else 0
            x = _llama_layer(layer, torch.cat([P, H]) if started else H, slots, backbone.config, slots if shift else 0)
            P, H = (x[:n_slots], x[n_slots:]) if started else (P, x)
        out.append(_rms(backbone.base.norm, H)[-1])
    return torch.stack(out)


@pytest.mark.parametrize("discard", [1.0, 0.0])
@pytest.mark.parametrize("arch_mask", [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]])
def test_prompted_llama_forward_equals_an_independent_implementation(tiny_decoders, discard, arch_mask):
    net = decoder_supernet(tiny_decoders["llama"], dtype=torch.float64, discard=discard)
    with torch.no_grad():
        net.gates.logits.copy_(torch.linspace(-1.0, 1.5, 4))
        batch = encode(net.backbone.tokenizer, SENTENCES)
        expected = _reference_last_states(net, batch, arch_mask)
        shifted = _reference_last_states(net, batch, arch_mask, shift=True)
        got = net(batch, arch_mask=[float(m) for m in arch_mask]).representation
    # Hugging Face's LLaMA keeps RMSNorm and the rotary angles in float32 in a float64 model, where a
    # float64 rounding difference now and then flips a float32 rounding: agreement is at float32
    # precision (slots attending causally among themselves would differ by 2e-4 here).
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # Rotary attention sees only position differences: the text shifted past the slots is the same.
    torch.testing.assert_close(shifted, expected, atol=2e-6, rtol=0)


# ---------------------------------------------------------------- heads


def test_clm_verbalizer_scores_label_words_as_the_next_token(tiny_decoders):
    from transformers import AutoModelForCausalLM

    net = decoder_supernet(tiny_decoders["gpt2"], head=CLM)
    tok = net.backbone.tokenizer
    split = encode_split(tok, [Example(s, None, 0) for s in SENTENCES], 32, net.head_config)
    assert split.mask_positions is None
    assert all(tok.decode(ids).endswith("it was") for ids in split.input_ids)  # read up to {mask}
    batch = collate(split, [0, 1, 2, 3])
    reference = AutoModelForCausalLM.from_pretrained(tiny_decoders["gpt2"]).eval()
    words = [tok.encode(" bad")[0], tok.encode(" good")[0]]
    with torch.no_grad():
        out = net(batch, arch_mask=torch.zeros(4))
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = torch.tensor([len(ids) - 1 for ids in split.input_ids])
    torch.testing.assert_close(out.logits, logits[torch.arange(4), last][:, words], atol=1e-5, rtol=0)
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"generators", "gates"}


def test_decoder_heads_refuse_what_does_not_fit(tiny_decoders, tiny_models):
    with pytest.raises(ConfigError, match="head.pooling: 'cls' pools the first token, which in a decoder sees only itself"):
        decoder_supernet(tiny_decoders["gpt2"], head={"pooling": "cls"})
    mlm = {**CLM, "type": "mlm"}
    with pytest.raises(ConfigError, match="head.type: 'mlm' does not fit .*a decoder; its LM head serves head.type: clm"):
        decoder_supernet(tiny_decoders["llama"], head=mlm)
    with pytest.raises(ConfigError, match="head.type: 'clm' does not fit .*an encoder; its LM head serves head.type: mlm"):
        decoder_supernet(tiny_models["roberta"], head=CLM)
    with pytest.raises(ConfigError, match=r"a clm verbalizer needs a template with \{text_a\} before any \{mask\}"):
        HeadConfig(**{**CLM, "template": "{mask} {text_a}"}).validate(LABELS)


def test_right_padded_batches_pool_the_last_real_token(tiny_decoders):
    net = decoder_supernet(tiny_decoders["llama"])
    assert net.head.pooling == "last" and net.backbone.default_pooling == "last"
    split = EncodedSplit([[5, 6, 7], [8], [9, 10]], None, [0, 1, 0], None, 0)
    batch = collate(split, [0, 1, 2])
    assert batch["last_positions"].tolist() == [2, 0, 1]
    states = torch.arange(3 * 3 * 2, dtype=torch.float32).view(3, 3, 2)
    without = {k: v for k, v in batch.items() if k != "last_positions"}  # found on the device instead
    torch.testing.assert_close(net.head.representation(states, batch), states[[0, 1, 2], [2, 0, 1]])
    torch.testing.assert_close(net.head.representation(states, without), states[[0, 1, 2], [2, 0, 1]])


# ---------------------------------------------------------------- a whole run, save and load


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_spt_run_on_a_tiny_decoder_exports_a_mask_and_reloads(tmp_path, tiny_decoders, family):
    instruction = "is it good or bad ?"
    config = tiny_config(tmp_path, tiny_decoders[family], head={"pooling": "auto"}, search={"epochs": 1},
                         task={"instruction": instruction})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    mask = json.loads((run / "layer_mask.json").read_text())
    assert mask["num_layers"] == 4 and len(mask["selected_layers"]) == 2 and sum(mask["mask"]) == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected_layers"] == mask["selected_layers"]
    sparse = load_prompt_model(run / "sparse")
    assert sparse.head.pooling == "last" and sparse.selected_layers == mask["selected_layers"]
    prep = prepare(load_config(config))
    evaluator = Evaluator(sparse, Feed(sparse, prep.train))
    assert evaluator.evaluate(prep.dev, 8, "accuracy")["accuracy"] == metrics["dev"]["accuracy"]  # the saved weights are the dev-best ones
    assert evaluator.evaluate(prep.test, 8, "accuracy")["accuracy"] == metrics["test"]["accuracy"]  # and scored the reported test
    assert sparse.instruction == instruction  # saved: new text is tokenized as in training
    predicted = sparse.predict(SENTENCES[:2])
    batch = collate(encode_split(sparse.backbone.tokenizer, [Example(t, None, 0) for t in SENTENCES[:2]], 32,
                                 sparse.head_config, instruction), [0, 1])
    with torch.no_grad():
        expected = sparse.eval()(batch).logits.softmax(-1)
    assert [p["probabilities"]["1"] for p in predicted] == pytest.approx(expected[:, 1].tolist(), abs=1e-6)


def test_decoder_supernet_save_load_round_trip(tiny_decoders, tmp_path):
    net = decoder_supernet(tiny_decoders["llama"], head=CLM)
    with torch.no_grad():
        net.gates.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    save_prompt_model(net, tmp_path / "supernet")
    loaded = load_prompt_model(tmp_path / "supernet").eval()
    split = encode_split(net.backbone.tokenizer, [Example(s, None, 0) for s in SENTENCES], 32, net.head_config)
    batch = collate(split, [0, 1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, net(batch).logits)
    assert isinstance(loaded, PromptSupernet) and loaded.head.kind == "clm"
    torch.testing.assert_close(loaded.alphas(), net.alphas())


def test_sequences_a_decoder_cannot_take_are_refused(tiny_decoders, tmp_path, capsys):
    config = tiny_config(tmp_path, tiny_decoders["gpt2"], head={"pooling": "auto"}, model={"max_length": 200})
    assert main(["run", str(config), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "model.max_length: must be at most 128 (GPT-2's learned positions), got 200" in capsys.readouterr().err
    backbone = load_backbone(str(tiny_decoders["qwen2"]))
    backbone.config.sliding_window = 40  # as Mistral's window, but short
    with pytest.raises(ConfigError, match="32 tokens \\+ 10 prompt slots exceed the attention window of 40 positions"):
        backbone.check_length(32, 10)
    backbone.check_length(30, 10)
