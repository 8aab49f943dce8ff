"""Tests that pin the method: the prompted forward against an independent re-implementation
of the equations in docs/method.md, the gate gradient against finite differences, and selection."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SENTENCES, encode
from torch import nn

from search.selection import gate_scores, greedy_ranking, removal_ranking
from spt import HeadConfig, PromptConfig, PromptSupernet, build_head, load_backbone
from spt.model import run_prompted_layers

LABELS = ["0", "1"]


def _supernet(model_dir, discard: float, dtype=torch.float64, candidates=None, pooling="cls", normalize=False,
              presence_bias=False) -> PromptSupernet:
    """(``normalize`` off by default: its target scale is the token states' size, detached, so
    finite differences, which see that size move with the gates, differ from the gradient.)"""
    torch.manual_seed(0)
    backbone = load_backbone(str(model_dir), dtype=dtype)
    prompt = PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=0.0, discard=discard, candidate_layers=candidates,
                          normalize=normalize, presence_bias=presence_bias)
    head = HeadConfig(pooling=pooling, dropout=0.0)
    net = PromptSupernet(backbone, prompt, build_head(backbone, head, LABELS), head, LABELS).to(dtype).eval()
    with torch.no_grad():
        net.gates.logits.copy_(torch.linspace(-1.0, 1.5, len(net.layers)))
    return net


# ---------------------------------------------------------------- an independent forward


def _kron_weight(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    return sum(torch.kron(A[j], S[j]) for j in range(A.shape[0]))


def _generator(net: PromptSupernet, j: int, H: torch.Tensor, mask: torch.Tensor, length: int) -> torch.Tensor:
    """docs/method.md §3 order: PHM down on every real token, adaptive average pooling to l, ReLU, PHM up."""
    g = net.generators
    out = []
    for b in range(H.shape[0]):
        real = H[b, mask[b].bool()]
        down = real @ _kron_weight(g.down.A[j], g.down.S[j]) + g.down.bias[j]
        pooled = nn.functional.adaptive_avg_pool1d(down.t().unsqueeze(0), length).squeeze(0).t()
        out.append(torch.relu(pooled) @ _kron_weight(g.up.A[j], g.up.S[j]) + g.up.bias[j])
    return torch.stack(out)


def _bert_layer(layer, x: torch.Tensor, key_mask: torch.Tensor, heads: int, key_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Post-LN BERT layer written out: attention over the unmasked keys (their scores plus
    ``key_bias`` (B, S) where given), feed-forward."""
    att = layer.attention
    B, S, d = x.shape
    q, k, v = (m(x).view(B, S, heads, d // heads).transpose(1, 2) for m in (att.self.query, att.self.key, att.self.value))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if key_bias is not None:
        scores = scores + key_bias[:, None, None, :]
    scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, d)
    h = att.output.LayerNorm(att.output.dense(context) + x)
    return layer.output.LayerNorm(layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))) + h)


def _reference_states(net: PromptSupernet, batch: dict[str, torch.Tensor], arch_mask: list[float]) -> torch.Tensor:
    """``P_i = (1 - lambda g_i) P_hat_i + g_i G_i(H_i)`` with ``g_i = alpha~_i m_i``; slots prepended and
    attended from the first layer with a prompt; the frozen layers run as alone before it. With
    ``prompt.presence_bias`` the slot keys' scores get ``log pi``, ``pi = 1 - prod_j (1 - g_j)``."""
    backbone, n_slots, lam = net.backbone, net.prompt_config.length, float(net.prompt_config.discard)
    mask = batch["attention_mask"]
    H = backbone.base.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    alpha = torch.sigmoid(net.gates.logits)
    P, started = torch.zeros(H.shape[0], n_slots, H.shape[-1], dtype=H.dtype), False
    none_yet = torch.ones((), dtype=H.dtype)  # the chance that no gate so far inserted a prompt
    for i, layer in enumerate(backbone.layers):
        if i in net.layers and arch_mask[net.layers.index(i)]:
            g = alpha[net.layers.index(i)]
            G = _generator(net, net.layers.index(i), H, mask, n_slots)
            if net.prompt_config.normalize:  # each prompt vector at the RMS of the example's real token states
                target = torch.stack([H[b, mask[b].bool()].pow(2).mean().sqrt() for b in range(H.shape[0])]).view(-1, 1, 1)
                G = G * target / (G.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            P = (1 - lam * g) * P + g * G
            none_yet = none_yet * (1 - g)
            started = True
        if started:
            keys = torch.cat([torch.ones(H.shape[0], n_slots), mask], 1)
            bias = None
            if net.prompt_config.presence_bias:
                bias = torch.zeros(keys.shape, dtype=H.dtype)
                bias[:, :n_slots] = torch.log(torch.clamp(1 - none_yet, min=1e-6))
            out = _bert_layer(layer, torch.cat([P, H], 1), keys, backbone.config.num_attention_heads, bias)
            P, H = out[:, :n_slots], out[:, n_slots:]
        else:
            H = _bert_layer(layer, H, mask, backbone.config.num_attention_heads)
    return H


@pytest.mark.parametrize(("normalize", "presence_bias"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("discard", [1.0, 0.0])
@pytest.mark.parametrize("arch_mask", [[1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 1, 0]])
def test_prompted_forward_equals_an_independent_implementation_of_the_equations(tiny_bert, discard, arch_mask, normalize,
                                                                                 presence_bias):
    net = _supernet(tiny_bert, discard, normalize=normalize, presence_bias=presence_bias)
    batch = encode(net.backbone.tokenizer, SENTENCES)
    with torch.no_grad():
        expected = _reference_states(net, batch, arch_mask)[:, 0]
        got = net(batch, arch_mask=[float(m) for m in arch_mask]).representation
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)


# ---------------------------------------------------------------- the gate gradient


# Per family: the difference step and the tolerances. LLaMA keeps RMSNorm and rotary angles in
# float32 inside a float64 model, so its finite differences take a larger step and tolerance.
FINITE_DIFFERENCES = {"bert": (1e-6, 1e-9, 1e-6), "gpt2": (1e-6, 1e-9, 1e-6), "llama": (1e-3, 1e-4, 1e-2)}


GRADIENT_CASES = [(family, discard, reparam, False) for family in ("bert", "gpt2", "llama") for discard in (1.0, 0.0)
                  for reparam in (False, True)] + [("bert", 1.0, True, True), ("gpt2", 1.0, True, True)]


@pytest.mark.parametrize(("family", "discard", "reparam", "presence_bias"), GRADIENT_CASES)
def test_gate_gradient_end_to_end_matches_finite_differences(tiny_models, tiny_decoders, family, discard, reparam, presence_bias):
    """Plain gates: the gradient is the loss's derivative. Re-parameterized gates keep the
    value (so finite differences see the plain derivative ``g``) and couple the gradient:
    ``dL/dalpha_k = g_k - (1/S) sum_i alpha_i g_i`` (docs/method.md §4). Decoders pool their last
    token. ``presence_bias`` adds the gates' second path, through the slots' attention."""
    net = _supernet({**tiny_models, **tiny_decoders}[family], discard, pooling="cls" if family == "bert" else "last",
                    presence_bias=presence_bias)
    net.gates.reparam = reparam
    batch = encode(net.backbone.tokenizer, SENTENCES)
    labels = torch.tensor([1, 0, 1, 1])

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(batch).logits, labels)

    (grad,) = torch.autograd.grad(loss(), net.gates.logits)
    plain = torch.zeros_like(grad)  # dL/da by central differences
    eps, atol, rtol = FINITE_DIFFERENCES[family]
    with torch.no_grad():
        for j in range(len(grad)):
            net.gates.logits[j] += eps
            up = loss()
            net.gates.logits[j] -= 2 * eps
            down = loss()
            net.gates.logits[j] += eps
            plain[j] = (up - down) / (2 * eps)
    alpha = torch.sigmoid(net.gates.logits.detach())
    g = plain / (alpha * (1 - alpha))  # dL/dalpha~ through the value
    expected = (g - (alpha * g).sum() / alpha.sum()) * alpha * (1 - alpha) if reparam else plain
    assert grad.abs().max() > 1e-6  # the gates do move the loss
    torch.testing.assert_close(grad, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_presence_bias_makes_closed_gates_absent_and_open_gates_plain(tiny_models, tiny_decoders, family):
    """Gates near 0: with ``prompt.presence_bias`` the slots get no attention and the supernet
    computes the frozen model's states; without it the zero slots are still attended. Gates
    near 1: the bias is log 1 = 0 and both passes agree."""
    from spt.model import unprompted_states

    model_dir = {**tiny_models, **tiny_decoders}[family]
    pooling = "cls" if family == "bert" else "last"
    hidden, plain = (_supernet(model_dir, 1.0, pooling=pooling, presence_bias=flag) for flag in (True, False))
    batch = encode(hidden.backbone.tokenizer, SENTENCES)
    real = batch["attention_mask"].bool()
    states = {}
    with torch.no_grad():
        frozen = unprompted_states(hidden.backbone, batch)[real]
        for logit in (-40.0, 40.0):
            for name, net in (("hidden", hidden), ("plain", plain)):
                net.gates.logits.fill_(logit)
                states[name, logit] = run_prompted_layers(
                    net.backbone, batch, net.generators, net._plan([(True,)] * len(net.layers), hard=False),
                    net.gates(), 3, 1.0)[real]
    torch.testing.assert_close(states["hidden", -40.0], frozen, atol=1e-5, rtol=0)
    assert (states["plain", -40.0] - frozen).abs().max() > 1e-2  # closed but attended: not the frozen model
    torch.testing.assert_close(states["hidden", 40.0], states["plain", 40.0], atol=1e-10, rtol=0)


def test_reparameterized_gates_compete_end_to_end(tiny_bert):
    """Raising every gate logit by the same amount leaves alpha~ = alpha * S/S unchanged in
    value but not in gradient: the coupled gradients sum to zero along alpha (sum_k alpha_k dL/dalpha_k = 0)."""
    net = _supernet(tiny_bert, 1.0)
    batch = encode(net.backbone.tokenizer, SENTENCES)
    alpha = torch.sigmoid(net.gates.logits.detach())
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(net(batch).logits, torch.tensor([1, 0, 1, 1])), net.gates.logits)
    grad_alpha = grad / (alpha * (1 - alpha))  # d alpha / d a = alpha (1 - alpha)
    assert abs(float((alpha * grad_alpha).sum())) < 1e-10 * float(grad_alpha.abs().max()) + 1e-12


# ---------------------------------------------------------------- selection


def test_removal_ranking_puts_the_layer_whose_removal_hurts_most_first():
    full = [0.5, 0.4, 0.6, 0.5]
    without = [[0.5, 0.4, 0.6, 0.5],   # layer 0: nothing changes
               [0.9, 0.8, 1.0, 0.9],   # layer 2: removal costs 0.4 per example
               [0.6, 0.5, 0.7, 0.6]]   # layer 4: 0.1
    ranking = removal_ranking([0, 2, 4], full, without, seed=0)
    assert ranking.order == [2, 4, 0] and ranking.scores == pytest.approx([0.0, 0.4, 0.1])
    assert ranking.spread == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)  # the same rise for every example


def test_perturbation_scores_of_a_constructed_supernet(tiny_bert):
    """Candidates 1, 2, 3 with lambda = 0 (add) and the generators of layers 2 and 3 emitting
    zeros: removing either changes nothing at all (the slots exist from layer 1 on either way);
    removing layer 1 changes the loss. (A zero prompt is not the same as none: at the first
    prompt layer its slots are attended, which is why layer 0 is not a candidate here.)"""
    net = _supernet(tiny_bert, 0.0, candidates=[1, 2, 3])
    with torch.no_grad():
        for j in (1, 2):  # the generators of layers 2 and 3
            net.generators.up.S[j].zero_()
            net.generators.up.bias[j].zero_()
    batch = encode(net.backbone.tokenizer, SENTENCES)
    labels = torch.tensor([1, 0, 1, 1])

    def losses(mask):
        with torch.no_grad():
            return nn.functional.cross_entropy(net(batch, arch_mask=mask).logits, labels, reduction="none").tolist()

    ranking = removal_ranking([1, 2, 3], losses(None), [losses([float(c != j) for c in range(3)]) for j in range(3)], 0)
    assert ranking.scores[1:] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert abs(ranking.scores[0]) > 1e-4
    assert ranking.order[0 if ranking.scores[0] > 0 else -1] == 1


def test_greedy_ranking_keeps_the_chosen_layers():
    """An interaction: layer 3 helps only with layer 1 chosen; greedy finds 1, then 3."""
    def dev_loss(chosen):
        base = 1.0 - 0.3 * (1 in chosen) - 0.05 * (0 in chosen) - 0.02 * (2 in chosen)
        return [base - (0.4 if {1, 3} <= set(chosen) else 0.0)] * 3

    ranking = greedy_ranking([0, 1, 2, 3], dev_loss, seed=0)
    assert ranking.order == [1, 3, 0, 2]
    assert ranking.scores[1] == pytest.approx(0.3) and ranking.scores[3] == pytest.approx(0.4)


def test_greedy_ranking_stops_at_k_and_scores_the_rest_in_the_last_round():
    """Two rounds of four candidates: 1 + 4 + 3 dev passes (not 1 + 4 + 3 + 2 + 1); the layers
    never chosen are scored by the drop they would have brought in round 2, where the second
    layer was chosen, so the K-th and the (K+1)-th compare like for like."""
    calls = []

    def dev_loss(chosen):
        calls.append(list(chosen))
        base = 1.0 - 0.3 * (1 in chosen) - 0.05 * (0 in chosen) - 0.02 * (2 in chosen)
        return [base - (0.4 if {1, 3} <= set(chosen) else 0.0)] * 3

    ranking = greedy_ranking([0, 1, 2, 3], dev_loss, seed=0, rounds=2)
    assert len(calls) == 1 + 4 + 3 and ranking.order == [1, 3, 0, 2]
    assert ranking.scores == pytest.approx([0.05, 0.3, 0.02, 0.4])  # 0 and 2: their drop in round 2
    assert ranking.summary == "dev loss 1.0000 with no prompt -> +1 0.7000 -> +3 0.3000; in round 2, layer 0 would have given 0.6500"
    whole = greedy_ranking([0, 1, 2, 3], dev_loss, seed=0)
    assert whole.order[:2] == ranking.order[:2] and len(calls) == 8 + 1 + 4 + 3 + 2 + 1


def test_gate_scores_average_the_last_steps_or_the_last_epoch():
    rows = [{"step": s, "epoch": e, "layer": layer, "alpha": a}
            for s, e, values in [(0, 0, (0.5, 0.5)), (1, 0, (0.6, 0.4)), (2, 1, (0.7, 0.3)), (3, 1, (0.9, 0.1))]
            for layer, a in zip((0, 1), values)]
    assert gate_scores(rows, [0, 1], 1) == ([0.9, 0.1], [0.0, 0.0])
    means, spread = gate_scores(rows, [0, 1], 2)
    assert means == pytest.approx([0.8, 0.2]) and spread == pytest.approx([0.1414214, 0.1414214])
    assert gate_scores(rows, [0, 1], 0)[0] == pytest.approx([0.8, 0.2])  # 0: the steps of the last epoch
    assert gate_scores(rows, [0, 1], 3)[0] == pytest.approx([0.7333333, 0.2666667])


def test_budget_aware_gates_hold_the_expected_parameter_count_during_the_search(tmp_path, tiny_bert):
    """``search.budget_params``: one global shift of the gate logits keeps sum(alpha) * per-generator
    parameters at the budget, within 1%, at every logged step."""
    from helpers import tiny_config

    from search.cli import main
    from search.selection import generator_parameters, read_gate_history

    per_generator = generator_parameters(32, 8, 2)  # tiny_config: hidden 32, bottleneck 8, PHM n 2
    budget = int(1.7 * per_generator)
    config = tiny_config(tmp_path, tiny_bert, search={"budget_params": budget, "epochs": 3}, select={"k": None, "budget": budget})
    assert main(["search", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    rows = read_gate_history(tmp_path / "run" / "gates.csv")
    for step in sorted({r["step"] for r in rows}):
        expected = sum(r["alpha"] for r in rows if r["step"] == step) * per_generator
        assert expected == pytest.approx(budget, rel=0.01), step
    finals = [r["alpha"] for r in rows if r["step"] == max(r["step"] for r in rows)]
    assert max(finals) - min(finals) > 0.01  # the gates still rank the layers
