"""The SPT model side: PHM, generator, gates, backbone adapter, supernet and sparse model."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, encode
from torch import nn

from spt import (
    ConfigError,
    HeadConfig,
    PHMLinear,
    PromptConfig,
    PromptGenerator,
    PromptSupernet,
    SparsePromptModel,
    UnsupportedBackboneError,
    adaptive_pool_weights,
    build_head,
    load_backbone,
    load_prompt_model,
    phm_parameter_count,
    reparameterize,
    save_prompt_model,
)
from spt.backbone import check_supported
from spt.gates import LayerGates, sample_architecture_mask
from spt.generator import PromptGenerators
from spt.model import make_plan, run_prompted_layers

LABELS = ["0", "1"]


def make_supernet(model_dir, head="classifier", pooling="cls", seed=0, **prompt):
    torch.manual_seed(seed)
    backbone = load_backbone(str(model_dir), with_lm_head=head == "mlm")
    prompt.setdefault("normalize", False)  # (the sparse model never rescales; these tests compare with it)
    cfg = PromptConfig(length=prompt.pop("length", 3), bottleneck=prompt.pop("bottleneck", 8), phm_n=prompt.pop("phm_n", 2), dropout=0.0, **prompt)
    if head == "mlm":
        head_cfg = HeadConfig(type="mlm", template="{text_a} it was {mask} .", label_words={"0": "bad", "1": "good"})
    else:
        head_cfg = HeadConfig(pooling=pooling, dropout=0.0)
    return PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)


# ---------------------------------------------------------------- PHM


# n^3 (the A_i) + d_in*d_out/n (the S_i) + d_out (bias), counted by hand for each shape
@pytest.mark.parametrize("d_in,d_out,n,count", [(32, 8, 2, 8 + 128 + 8), (384, 64, 4, 64 + 6144 + 64),
                                                 (768, 64, 1, 1 + 49152 + 64), (64, 32, 8, 512 + 256 + 32)])
def test_phm_parameter_count(d_in, d_out, n, count):
    layer = PHMLinear(d_in, d_out, n)
    assert sum(p.numel() for p in layer.parameters()) == count
    assert phm_parameter_count(d_in, d_out, n) == count


def test_phm_weight_is_sum_of_kronecker_products():
    layer = PHMLinear(12, 8, 4, count=3)
    x = torch.randn(5, 12)
    for c in range(3):
        expected = sum(torch.kron(layer.A[c, j], layer.S[c, j]) for j in range(4))
        torch.testing.assert_close(layer.weight()[c], expected)
        torch.testing.assert_close(layer(x, c), x @ expected + layer.bias[c])


def test_phm_weights_are_cached_only_without_gradients_and_rebuilt_after_an_update():
    layer = PHMLinear(8, 4, 2, count=2)
    first = layer.weight()
    assert first.requires_grad and layer.weight() is not first  # training: built anew each step
    with torch.no_grad():
        cached = layer.weight()
        assert layer.weight() is cached  # evaluation: built once
        layer.S.add_(1.0)  # an optimizer step changes the parameters in place
        rebuilt = layer.weight()
    assert rebuilt is not cached and not torch.allclose(rebuilt, cached)


def test_phm_n1_is_a_linear_layer():
    linear = nn.Linear(10, 6)
    phm = PHMLinear(10, 6, n=1)
    with torch.no_grad():
        phm.A.fill_(1.0)
        phm.S.copy_(linear.weight.T.view(1, 1, 10, 6))
        phm.bias.copy_(linear.bias.view(1, 6))
    x = torch.randn(3, 10)
    torch.testing.assert_close(phm(x), linear(x))


def test_phm_refuses_n_that_does_not_divide():
    with pytest.raises(ConfigError, match=r"prompt.phm_n: n=3 does not divide d_in=32"):
        PHMLinear(32, 9, 3)
    with pytest.raises(ConfigError, match="does not divide bottleneck=10"):
        PromptConfig(bottleneck=10, phm_n=4).validate(hidden_size=32)


# ---------------------------------------------------------------- generator


def test_pool_weights_match_adaptive_avg_pool_on_real_tokens():
    torch.manual_seed(0)
    for n_real, length in [(7, 3), (10, 10), (2, 5), (13, 4)]:
        x = torch.randn(1, n_real, 6)
        mask = torch.zeros(1, n_real + 4, dtype=torch.long)
        mask[0, :n_real] = 1
        padded = torch.cat([x, torch.randn(1, 4, 6)], dim=1)
        pooled = adaptive_pool_weights(mask, length) @ padded
        expected = nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), length).transpose(1, 2)
        torch.testing.assert_close(pooled, expected)


def test_generator_output_does_not_change_with_padding():
    torch.manual_seed(0)
    gen = PromptGenerator(16, 8, phm_n=2, dropout=0.0)
    x = torch.randn(1, 5, 16)
    alone = gen(x, adaptive_pool_weights(torch.ones(1, 5), 3))
    padded = torch.cat([x, 100 * torch.randn(1, 7, 16)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 7])
    torch.testing.assert_close(gen(padded, adaptive_pool_weights(mask, 3)), alone)
    assert alone.shape == (1, 3, 16)


def test_pooling_before_projection_equals_projection_before_pooling():
    torch.manual_seed(1)
    gen = PromptGenerator(16, 8, phm_n=4, dropout=0.0)
    x = torch.randn(2, 9, 16)
    w = adaptive_pool_weights(torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), 4)
    reference = gen.up(gen.act(w @ gen.down(x)))
    torch.testing.assert_close(gen(x, w), reference)


def test_stacked_generators_start_as_separately_built_ones_would():
    """One stack of C generators holds the weights C generators built in a row would get."""
    torch.manual_seed(3)
    stack = PromptGenerators(3, 16, 8, phm_n=2, dropout=0.0)
    torch.manual_seed(3)
    singles = [PromptGenerator(16, 8, phm_n=2, dropout=0.0) for _ in range(3)]
    for c, single in enumerate(singles):
        for (name, a), (_, b) in zip(stack.named_parameters(), single.named_parameters()):
            torch.testing.assert_close(a[c], b[0], msg=name)


# ---------------------------------------------------------------- gates


def test_reparameterized_gate_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(6, requires_grad=True)
    alpha = torch.sigmoid(logits)
    tilde = reparameterize(alpha)
    torch.testing.assert_close(tilde, alpha)
    upstream = torch.randn(6)  # g_i = dL/d(alpha~_i)
    (grad_alpha,) = torch.autograd.grad((tilde * upstream).sum(), alpha)
    S = alpha.detach().sum()
    closed_form = upstream - (alpha.detach() * upstream).sum() / S
    torch.testing.assert_close(grad_alpha, closed_form)


def test_gates_start_at_one_half_and_reparam_switch():
    gates = LayerGates(4)
    torch.testing.assert_close(gates(), torch.full((4,), 0.5))
    plain = LayerGates(4, reparam=False)
    plain.logits.data = torch.randn(4)
    g = torch.randn(4)
    (grad,) = torch.autograd.grad((plain() * g).sum(), plain.logits)
    a = plain.alpha().detach()
    torch.testing.assert_close(grad, g * a * (1 - a))  # plain DARTS: no coupling


def test_architecture_mask_is_seeded_bernoulli():
    m1 = sample_architecture_mask(1000, 0.3, torch.Generator().manual_seed(1))
    m2 = sample_architecture_mask(1000, 0.3, torch.Generator().manual_seed(1))
    other = sample_architecture_mask(1000, 0.3, torch.Generator().manual_seed(2))
    assert torch.equal(m1, m2) and not torch.equal(m1, other)  # the seed, and only the seed, fixes the mask
    assert m1.dtype == torch.float32 and m1.sum().item() == (m1 == 1).sum().item()  # 0/1 values, not probabilities
    assert 0.25 < m1.mean().item() < 0.35


# ---------------------------------------------------------------- backbone adapter and supernet


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "electra"])
def test_closed_gates_give_the_frozen_backbone_output(tiny_models, family):
    from transformers import AutoModel

    net = make_supernet(tiny_models[family])
    batch = encode(net.backbone.tokenizer, SENTENCES)
    reference = AutoModel.from_pretrained(tiny_models[family]).eval()
    with torch.no_grad():
        expected = reference(**batch).last_hidden_state
        L = net.backbone.num_layers
        plan = make_plan(L, net.layers, [(False,) * 4] * L, hard=False, discard=1.0)
        assert plan.first == L and plan.layers == ()
        states = run_prompted_layers(net.backbone, batch, net.generators, plan, net.gates(), 3, 1.0)
        out = net(batch, arch_mask=torch.zeros(L))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(states[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.representation, expected[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bert", "mpnet"])
def test_prompts_change_output_and_padding_does_not(tiny_models, family):
    net = make_supernet(tiny_models[family]).eval()
    tok = net.backbone.tokenizer
    with torch.no_grad():
        batch = encode(tok, SENTENCES)
        full = net(batch)
        closed = net(batch, arch_mask=torch.zeros(net.backbone.num_layers))
        alone = net(encode(tok, SENTENCES[2:3]))
    assert not torch.allclose(full.representation, closed.representation, atol=1e-4)
    torch.testing.assert_close(full.logits[2:3], alone.logits, atol=1e-5, rtol=0)


def test_unsupported_family_is_named_with_the_supported_ones():
    with pytest.raises(UnsupportedBackboneError, match=r"'t5' is not supported; supported families: bert, camembert, "
                       r"electra, gpt2, llama, mistral, mpnet, qwen2, roberta"):
        check_supported("t5")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    from spt import UserError

    with pytest.raises(UserError, match="no model directory at"):
        load_backbone(str(tmp_path / "nope" / "model"))


def test_only_generators_gates_and_head_train_and_backbone_stays_bit_identical(tiny_bert):
    net = make_supernet(tiny_bert)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"generators", "gates", "head"}
    before = {n: p.detach().clone() for n, p in net.backbone.named_parameters()}
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1)
    batch = encode(net.backbone.tokenizer, SENTENCES)
    net.train()
    loss = nn.functional.cross_entropy(net(batch).logits, torch.tensor([1, 0, 1, 1]))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in net.backbone.parameters())
    for n, p in net.backbone.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not net.backbone.training and net.training


@pytest.mark.parametrize("discard", [1.0, 0.0])
def test_sparse_model_equals_supernet_with_hard_gates(tiny_bert, discard):
    net = make_supernet(tiny_bert, discard=discard).eval()
    layers = [1, 3]
    sparse = SparsePromptModel(net.backbone, net.prompt_config, net.head, net.head_config, LABELS, layers).eval()
    sparse.load_generators_from(net)
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0])
    batch = encode(net.backbone.tokenizer, SENTENCES)
    with torch.no_grad():
        a = sparse(batch)
        b = net(batch, arch_mask=mask, hard_gates=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.representation, b.representation, atol=1e-6, rtol=0)


def test_consistency_pair_equals_two_separate_passes(tiny_models):
    net = make_supernet(tiny_models["mpnet"]).eval()
    batch = encode(net.backbone.tokenizer, SENTENCES)
    mask = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        full, masked = net.forward_consistency(batch, mask)
        torch.testing.assert_close(full.representation, net(batch).representation, atol=1e-5, rtol=0)
        torch.testing.assert_close(masked.representation, net(batch, arch_mask=mask).representation, atol=1e-5, rtol=0)


def test_mlm_verbalizer_head(tiny_models):
    net = make_supernet(tiny_models["roberta"], head="mlm")
    tok = net.backbone.tokenizer
    texts = [f"{s} it was {tok.mask_token} ." for s in SENTENCES]
    batch = encode(tok, texts)
    batch["mask_positions"] = (batch["input_ids"] == tok.mask_token_id).int().argmax(1)
    out = net(batch)
    assert out.logits.shape == (4, 2)
    # The MLM head is frozen: only generators and gates train.
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"generators", "gates"}


def test_save_load_round_trip(tiny_bert, tmp_path):
    net = make_supernet(tiny_bert).eval()
    with torch.no_grad():
        net.gates.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    save_prompt_model(net, tmp_path / "supernet")
    loaded = load_prompt_model(tmp_path / "supernet").eval()
    batch = encode(net.backbone.tokenizer, SENTENCES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, net(batch).logits)
    assert isinstance(loaded, PromptSupernet)
    torch.testing.assert_close(loaded.alphas(), net.alphas())
    assert all(name.startswith(("generators.", "gates.", "head.")) for name in net.trainable_state_dict())


def test_corrupt_weights_are_refused(tiny_bert, tmp_path):
    from spt import UserError

    net = make_supernet(tiny_bert)
    save_prompt_model(net, tmp_path / "m")
    (tmp_path / "m" / "prompt_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt or not a safetensors file"):
        load_prompt_model(tmp_path / "m")


def test_candidate_layers_restrict_generators(tiny_bert):
    net = make_supernet(tiny_bert, candidate_layers=[0, 2])
    assert net.candidate_layers == [0, 2] and len(net.gates.logits) == 2
    with pytest.raises(ConfigError, match=r"prompt.candidate_layers: layers \[7\] do not exist"):
        make_supernet(tiny_bert, candidate_layers=[0, 7])


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "electra"])
def test_keys_values_only_layer_equals_the_full_layer(tiny_models, family):
    """Slots that nobody reads skip queries and feed-forward; the tokens' outputs stay the same."""
    backbone = load_backbone(str(tiny_models[family]))
    batch = encode(backbone.tokenizer, SENTENCES)
    torch.manual_seed(0)
    B, T = batch["input_ids"].shape
    with torch.no_grad():
        hidden = backbone.embed(batch["input_ids"], batch.get("token_type_ids"))
        sequence = torch.cat([torch.randn(B, 3, hidden.shape[-1]), hidden], dim=1)
        key_mask = torch.cat([torch.ones(B, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
        context = backbone.layer_context(sequence, key_mask)
        for i in range(backbone.num_layers):
            full = backbone.run_layer(i, sequence, context)[:, 3:]
            partial = backbone.run_layer(i, sequence, context, queries_from=3)
            real = batch["attention_mask"].bool()
            torch.testing.assert_close(partial[real], full[real], atol=1e-5, rtol=0)
