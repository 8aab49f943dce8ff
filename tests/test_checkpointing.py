"""``runtime.activation_checkpointing``: the prompted layers recomputed in the backward pass give
the loss and gradients of a plain pass (dropout included: the RNG state is restored), keep fewer
bytes for the backward pass, and a whole run ends with the gates of an unchecked one."""

from __future__ import annotations

import pytest
import torch
from conftest import SENTENCES, encode
from helpers import assert_same_gates, tiny_config
from torch.utils.checkpoint import checkpoint

from search.cli import main
from search.config import ConfigError, load_config
from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone, prompted
from spt.model import PromptModel

LABELS = ["0", "1"]
MODES = ("none", "prompted", "all")
MASK = torch.tensor([1.0, 0.0, 1.0, 1.0])  # the supernet's architecture mask (soft gates)
SPARSE_LAYERS = [1, 3]


def _model(model_dir, kind: str, dropout: float) -> PromptModel:
    """A float64 supernet on ``model_dir``, or the sparse model on :data:`SPARSE_LAYERS` made from it."""
    torch.manual_seed(0)
    head_cfg = HeadConfig(pooling="auto", dropout=dropout)
    backbone = load_backbone(str(model_dir), dtype=torch.float64)
    prompt = PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=dropout)
    net = PromptSupernet(backbone, prompt, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)
    if kind == "sparse":
        sparse = SparsePromptModel(backbone, prompt, net.head, head_cfg, LABELS, SPARSE_LAYERS)
        sparse.load_generators_from(net)
        net = sparse
    return net.to(torch.float64)


def _forward(model: PromptModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed cross-entropy of one pass (the supernet with soft gates under :data:`MASK`)."""
    labels = torch.arange(len(batch["input_ids"])) % len(LABELS)
    out = model(batch, arch_mask=MASK) if isinstance(model, PromptSupernet) else model(batch)
    return torch.nn.functional.cross_entropy(out.logits, labels)


def _loss_and_grads(model: PromptModel, batch: dict[str, torch.Tensor], mode: str,
                    backbone_dropout: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and every trainable gradient of one seeded pass with ``mode`` checkpointing."""
    model.activation_checkpointing = mode
    model.train(backbone_dropout)
    model.backbone.train(backbone_dropout)  # (dropout inside the checkpointed layers: the RNG test)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = _forward(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kind", ["supernet", "sparse"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_checkpointed_loss_and_gradients_equal_a_plain_pass(tiny_models, tiny_decoders, family, kind, dropout):
    model = _model({**tiny_models, **tiny_decoders}[family], kind, dropout)
    batch = encode(model.backbone.tokenizer, SENTENCES)
    loss, grads = _loss_and_grads(model, batch, "none", dropout > 0)
    assert len(grads) > 2 and all(g.abs().sum() > 0 for g in grads)
    for mode in MODES[1:]:
        other, other_grads = _loss_and_grads(model, batch, mode, dropout > 0)
        torch.testing.assert_close(other, loss, rtol=1e-6, atol=1e-9)
        for a, b in zip(other_grads, grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    if dropout:  # the dropout is real: an unseeded pass draws other masks
        model.activation_checkpointing = "none"
        assert not torch.allclose(_forward(model, batch), loss)


def saved_bytes(model: PromptModel, batch: dict[str, torch.Tensor]) -> int:
    """Bytes a forward pass keeps for its backward pass: the saved tensors, each storage once,
    the model's own weights left out (kept anyway: no activation)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        pointer = t.untyped_storage().data_ptr()
        if pointer not in weights:
            seen[pointer] = max(seen.get(pointer, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _forward(model, batch)
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["supernet", "sparse"])
def test_checkpointing_the_prompted_layers_keeps_fewer_bytes(tiny_bert, kind):
    model = _model(tiny_bert, kind, 0.0).eval()
    batch = encode(model.backbone.tokenizer, SENTENCES * 4)
    measured = {}
    for mode in MODES:
        model.activation_checkpointing = mode
        measured[mode] = saved_bytes(model, batch)
    ratio = measured["prompted"] / measured["none"]
    print(f"{kind}: saved-for-backward bytes {measured}, prompted/none {ratio:.3f}")
    assert ratio < 0.5
    assert measured["all"] == measured["prompted"]  # (nothing below the first prompt runs with autograd)


def test_a_checkpointed_run_ends_with_the_gates_of_a_plain_one(tmp_path, tiny_bert, monkeypatch):
    calls = []

    def counted(*args, **kwargs):  # (the setting reaches the models the run trains)
        calls.append(kwargs)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(prompted, "checkpoint", counted)
    config = tiny_config(tmp_path, tiny_bert, prompt={"dropout": 0.0}, head={"dropout": 0.0},
                         search={"epochs": 1}, retrain={"epochs": 1})
    runs = {mode: tmp_path / mode for mode in ("none", "prompted")}
    for mode, run in runs.items():
        args = ["run", str(config), "--out", str(run), "--quiet", "--set", f"runtime.activation_checkpointing={mode}"]
        assert main(args) == 0
        assert bool(calls) == (mode != "none")
    assert all(not c["use_reentrant"] and c["preserve_rng_state"] for c in calls)
    assert_same_gates(runs["none"], runs["prompted"])


def test_an_unknown_checkpointing_mode_is_refused(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="runtime.activation_checkpointing"):
        load_config(tiny_config(tmp_path, tiny_bert, runtime={"activation_checkpointing": "some"}))
