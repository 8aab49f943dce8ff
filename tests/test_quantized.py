"""``model.quantize`` (issue 28, item 3): the backbone's layers in 8 or 4 bits through bitsandbytes.

A quantized layer computes what its dequantized weights compute (LLM.int8() also rounds its
inputs), passes gradients to its inputs, and stores a quarter (int8) or an eighth (4-bit) of
the bytes; prompts train through it on encoders and decoders, with checkpointing and kept
states as without it; a run saves only what trains and loads back quantized, predicting what it
reported; where it cannot run, one line says which field and what to do, before anything is written.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SENTENCES, encode
from helpers import refused, tiny_config
from torch import nn

from search.cli import main
from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone
from spt.backbone import quantize as quantization
from spt.backbone.quantize import quantize_linears, stored_bytes
from spt.errors import UserError

LABELS = ["0", "1"]
MODES = ("int8", "nf4", "fp4")
# what a mode may move a tiny random model's logits by (uniform random weights are the worst case for 4 bits)
LOGIT_TOLERANCE = {"int8": 0.02, "nf4": 0.3, "fp4": 0.3}


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes")


def _dequantized(layer: nn.Module) -> torch.Tensor:
    """The float weight a quantized layer stands for."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    codes, scales = layer.state.CB if layer.state.CB is not None else layer.weight.CB, layer.state.SCB
    scales = scales if scales is not None else layer.weight.SCB
    return codes.float() * scales.float().unsqueeze(1) / 127


@pytest.mark.parametrize("mode", MODES)
def test_a_quantized_linear_computes_its_dequantized_weights_and_passes_gradients_to_its_inputs(bnb, mode):
    torch.manual_seed(0)
    layer = nn.Linear(256, 512).requires_grad_(False)
    holder = nn.Sequential(layer)
    quantize_linears(holder, mode, torch.float32)
    quantized = holder[0].eval()
    assert type(quantized) is (bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit)
    assert not any(p.requires_grad for p in quantized.parameters())
    x = torch.randn(3, 7, 256, requires_grad=True)
    y = quantized(x)
    y.pow(2).sum().backward()
    weight = _dequantized(quantized)
    assert 0 < (weight - layer.weight).abs().max() < (0.01 if mode == "int8" else 0.05)
    exact = x.detach().requires_grad_(True)
    expected = nn.functional.linear(exact, weight, layer.bias)
    (2 * y.detach() * expected).sum().backward()  # the gradient of |y|^2 at y, through the dequantized weights
    torch.testing.assert_close(x.grad, exact.grad, atol=1e-4, rtol=1e-4)
    if mode == "int8":  # LLM.int8() rounds the inputs to 8 bits as well: close, not equal
        assert (y - expected).abs().max() < 0.02 * expected.abs().max()
    else:
        torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)
    fp32, stored = stored_bytes(layer), stored_bytes(quantized)
    assert stored < fp32 * (0.27 if mode == "int8" else 0.15), (
        stored,
        fp32,
    )  # 8 bits + a scale per row; 4 + a scale per 64


def _supernet(backbone, seed: int = 0) -> PromptSupernet:
    torch.manual_seed(seed)
    prompt, head = PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=0.0), HeadConfig(pooling="auto", dropout=0.0)
    return PromptSupernet(backbone, prompt, build_head(backbone, head, LABELS), head, LABELS)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_prompts_train_through_a_quantized_backbone_whose_logits_stay_close(
    bnb, tiny_models, tiny_decoders, family, mode
):
    path = str({**tiny_models, **tiny_decoders}[family])
    plain, quantized = _supernet(load_backbone(path)), _supernet(load_backbone(path, quantize=mode))
    layers = quantized.backbone.layers
    kinds = {type(m) for m in layers.modules() if isinstance(m, nn.Linear)}
    assert kinds == {bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit}
    # the embeddings (and a decoder's LM head and final norm) keep their dtype; what trains is fp32
    embeddings = quantized.backbone.base.get_input_embeddings()
    assert type(embeddings) is nn.Embedding and embeddings.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in quantized.parameters() if p.requires_grad)
    assert stored_bytes(layers) < 0.45 * stored_bytes(plain.backbone.layers)
    batch = encode(quantized.backbone.tokenizer, SENTENCES)
    out, reference = quantized(batch), plain(batch)
    difference = (out.logits - reference.logits).abs().max().item()
    assert 0 < difference < LOGIT_TOLERANCE[mode]
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 0, 1])).backward()
    grads = [p.grad for p in quantized.generators.parameters()] + [quantized.gates.logits.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_checkpointing_and_kept_states_compute_what_a_plain_pass_through_the_quantized_layers_does(
    bnb, tiny_models, tiny_decoders, family
):
    backbone = load_backbone(str({**tiny_models, **tiny_decoders}[family]), quantize="int8")
    torch.manual_seed(0)
    prompt, head = PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=0.0), HeadConfig(pooling="auto", dropout=0.0)
    model = SparsePromptModel(backbone, prompt, build_head(backbone, head, LABELS), head, LABELS, [1, 3])
    batch = encode(backbone.tokenizer, SENTENCES)
    labels = torch.tensor([0, 1, 0, 1])

    def gradients(mode: str, inputs: dict) -> list[torch.Tensor]:
        model.activation_checkpointing = mode
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs).logits, labels).backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = gradients("none", batch)
    for a, b in zip(plain, gradients("all", batch)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    with torch.no_grad():  # the states below the first prompt layer, kept (search/frozen.py)
        kept = {**batch, "frozen_states": model.states_below_prompts(batch), "frozen_upto": model.frozen_upto}
    for a, b in zip(plain, gradients("none", kept)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_quantized_backbone_moved_to_a_gpu_computes_what_it_computes_on_the_cpu(bnb, tiny_decoders, mode):
    """Quantized at load time on the host, then moved: the same codes and scales on the GPU."""
    model = _supernet(load_backbone(str(tiny_decoders["llama"]), quantize=mode))
    batch = encode(model.backbone.tokenizer, SENTENCES)
    with torch.no_grad():
        on_cpu = model(batch).logits
    model.to("cuda")
    out = model({k: v.to("cuda") for k, v in batch.items()})
    assert (out.logits.detach().cpu() - on_cpu).abs().max() < 1e-2  # (other kernels: rounding only)
    out.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.generators.parameters())


# ---------------------------------------------------------------------- a whole run


def _test_loss(model: SparsePromptModel, examples: list[tuple[str, int]]) -> float:
    results = model.predict([text for text, _ in examples])
    return sum(-math.log(r["probabilities"][model.labels[gold]]) for r, (_, gold) in zip(results, examples)) / len(
        examples
    )


@pytest.mark.parametrize("family, mode", [("bert", "int8"), ("llama", "nf4")])
def test_a_quantized_run_searches_retrains_and_its_saved_model_loads_back_quantized(
    bnb, tmp_path, tiny_models, tiny_decoders, family, mode, capsys
):
    from search.data import load_task
    from search.selection import read_gate_history

    model_dir = {**tiny_models, **tiny_decoders}[family]
    config = tiny_config(
        tmp_path, model_dir, model={"quantize": mode}, head={"pooling": "cls" if family == "bert" else "auto"}
    )
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    alphas = [row["alpha"] for row in read_gate_history(run / "gates.csv")]
    assert len(alphas) > 8 and max(abs(a - 0.5) for a in alphas[-4:]) > 1e-3  # the gates moved
    saved = json.loads((run / "sparse" / "prompt_config.json").read_text())
    assert saved["quantize"] == mode
    from safetensors import safe_open

    with safe_open(str(run / "sparse" / "prompt_weights.safetensors"), "pt") as handle:  # what trains, nothing else
        assert all(name.startswith(("generators.", "head.")) for name in handle.keys())
    model = SparsePromptModel.from_pretrained(run / "sparse")
    assert model.backbone.quantize == mode
    assert any(type(m).__module__.startswith("bitsandbytes") for m in model.backbone.layers.modules())
    # it scores the run's test split as the run reported
    from search.config import load_config

    run_config = load_config(config)
    test = [(ex.text_a, ex.label) for ex in load_task(run_config.task, run_config.seed).test]
    reported = json.loads((run / "metrics.json").read_text())["test"]
    assert _test_loss(model, test) == pytest.approx(reported["loss"], abs=1e-5)
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(reported["accuracy"])
    # unquantized on request: the same prompts on the full-precision layers
    full = SparsePromptModel.from_pretrained(run / "sparse", quantize="none")
    assert full.backbone.quantize == "none" and not any(
        type(m).__module__.startswith("bitsandbytes") for m in full.backbone.layers.modules()
    )
    assert _test_loss(full, test) == pytest.approx(reported["loss"], abs=0.1)


def test_a_saved_quantized_model_without_bitsandbytes_names_the_fix(bnb, tmp_path, tiny_bert, monkeypatch):
    from spt import save_prompt_model
    from spt.model import load_prompt_model

    model = _supernet(load_backbone(str(tiny_bert), quantize="nf4"))
    save_prompt_model(model, tmp_path / "m")
    monkeypatch.setattr(quantization, "available", lambda: False)
    with pytest.raises(
        UserError,
        match=r"^quantize: .* quantized to nf4, which needs bitsandbytes: pip install "
        r"'spt-search\[quant\]' \(bitsandbytes\); or load it unquantized: quantize='none'",
    ):
        load_prompt_model(tmp_path / "m")
    assert load_prompt_model(tmp_path / "m", quantize="none").backbone.quantize == "none"


def test_baselines_run_on_the_quantized_backbone_and_finetune_is_refused(bnb, tiny_bert):
    from search.baselines import build_baseline

    model = build_baseline("peft-lora", str(tiny_bert), 2, "mean", 0.0, 3, target_params=100, quantize="int8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    batch = encode(_tokenizer(tiny_bert), SENTENCES)
    model(batch).logits.sum().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    with pytest.raises(UserError, match=r"^strategy finetune: trains every backbone weight, and model.quantize: int8"):
        build_baseline("finetune", str(tiny_bert), 2, "mean", 0.0, 3, target_params=100, quantize="int8")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------- refusals: one line, nothing written


def test_a_missing_bitsandbytes_is_refused_before_anything_is_written(tmp_path, tiny_bert, monkeypatch, capsys):
    monkeypatch.setattr(quantization, "available", lambda: False)
    config, run = tiny_config(tmp_path, tiny_bert), tmp_path / "run"
    refused(
        capsys,
        ["run", str(config), "--out", str(run), "--set", "model.quantize=nf4"],
        "error: model.quantize: nf4 needs bitsandbytes, which is not installed: pip install 'spt-search[quant]' "
        "(bitsandbytes); or set model.quantize: none",
    )
    assert not run.exists()


def test_an_unknown_mode_and_a_gpt2_backbone_are_refused(tmp_path, tiny_bert, tiny_decoders, monkeypatch, capsys):
    config, run = tiny_config(tmp_path, tiny_bert), tmp_path / "run"
    refused(
        capsys,
        ["run", str(config), "--out", str(run), "--set", "model.quantize=int4"],
        "error: model.quantize: unknown value 'int4'; choose one of none, int8, nf4, fp4",
    )
    monkeypatch.setattr(
        quantization, "available", lambda: True
    )  # (the family is refused whether it is installed or not)
    gpt2 = tiny_config(tmp_path, tiny_decoders["gpt2"], head={"pooling": "last"})
    refused(
        capsys,
        ["run", str(gpt2), "--out", str(run), "--set", "model.quantize=int8"],
        "error: model.quantize: int8 is not offered for gpt2 backbones (their fused Conv1D projections are not "
        "nn.Linear layers); use model.quantize: none",
    )
    assert not run.exists()


def test_compare_refuses_finetuning_a_quantized_backbone(bnb, tmp_path, tiny_bert, capsys):
    config, out = tiny_config(tmp_path, tiny_bert, model={"quantize": "int8"}), tmp_path / "compare"
    refused(
        capsys,
        ["compare", str(config), "--out", str(out), "--strategies", "first", "finetune", "--quiet"],
        "error: strategy finetune: trains every backbone weight, and model.quantize: int8 holds them frozen in fewer "
        "bits; leave finetune out, or set model.quantize: none",
    )
    assert not out.exists()
