"""Make the reference values that pin today's numerics (run once, at commit 0c9a67b).

    PYTHONPATH=tests python tests/reference/make_reference.py

Writes, next to this file:

* ``search-gates-nodropout.csv``: the gate history of a tiny seeded search without dropout
  (``search-config.yaml`` holds every setting it used, spelled out, so later default changes
  cannot move it). The run with dropout 0.1 was dropped when the generators began to run
  for every example of the consistency batch: dropout then draws other random numbers;
* ``model-reference.safetensors``: logits, representations and gradients of a tiny seeded
  supernet and sparse model on a fixed batch (lambda 0 and 1, full, masked, per-example masks).

The tests in ``tests/test_reference.py`` recompute the same numbers with the current code.
Do not regenerate these files after a change to the model or trainer: they are the "before".
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from conftest import SENTENCES, encode, make_tiny_model  # noqa: E402
from helpers import write_sentiment_tsv  # noqa: E402

SEARCH = {
    "seed": 7,
    "model": {"max_length": 32},
    "prompt": {"length": 3, "bottleneck": 8, "phm_n": 2, "activation": "relu", "dropout": 0.1, "discard": 1,
               "reparam_gates": True, "gate_init": 0.0, "candidate_layers": None, "normalize": False},
    "head": {"type": "classifier", "pooling": "cls", "dropout": 0.1},
    "task": {"name": "toy", "format": "tsv", "train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv",
             "text_a": "sentence", "label": "label", "labels": ["0", "1"]},
    "search": {"epochs": 3, "warmup_epochs": 0, "batch_size": 4, "eval_batch_size": 8, "d1_fraction": 0.5,
               "lr": 1.0e-3, "weight_decay": 0.01, "arch_lr": 5.0e-2, "arch_weight_decay": 0.0,
               "consistency_weight": 1.0, "mask_prob": 0.5, "grad_clip": 1.0, "log_every": 1,
               "checkpoint_every": 1000, "arch_dropout": True, "arch_batches": 1},
    "select": {"k": 2, "average_last": 1},
    "retrain": {"epochs": 1, "batch_size": 4},
    "runtime": {"progress": False, "threads": 1},
}


def write_search_inputs(folder: Path, model_dir: Path, dropout: float) -> Path:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_sentiment_tsv(data / "train.tsv", 48, seed=1)
    write_sentiment_tsv(data / "dev.tsv", 8, seed=2)
    write_sentiment_tsv(data / "test.tsv", 8, seed=3)
    config = yaml.safe_load(yaml.safe_dump(SEARCH))
    config["model"]["backbone"] = str(model_dir)
    config["task"]["data_dir"] = str(data)
    config["prompt"]["dropout"] = dropout
    config["head"]["dropout"] = dropout
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def per_layer_grads(model, key: str) -> dict[str, torch.Tensor]:
    """Gradients named as the reference names them: one generator per layer (``generators.3.down.A``)."""
    out = {}
    for pname, p in model.named_parameters():
        if p.grad is None:
            continue
        parts = pname.split(".")
        if parts[0] == "generators" and len(parts) == 3:  # a stack: generators.down.A -> one per layer
            for j, layer in enumerate(model.layers):
                out[f"{key}.grad.generators.{layer}.{parts[1]}.{parts[2]}"] = p.grad[j].detach().clone()
        elif parts[0] == "generators" and parts[1].isdigit():  # the implementation that made the reference
            out[f"{key}.grad.{pname}"] = p.grad.detach().clone()
        else:
            out[f"{key}.grad.{pname}"] = p.grad.detach().clone()
    return out


def model_cases(model_dir: Path) -> dict[str, torch.Tensor]:
    from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone

    labels = ["0", "1"]
    out: dict[str, torch.Tensor] = {}
    backbone = load_backbone(str(model_dir))
    batch = encode(backbone.tokenizer, SENTENCES)
    target = torch.tensor([1, 0, 1, 1])
    for discard in (1.0, 0.0):
        torch.manual_seed(0)
        prompt = PromptConfig(length=3, bottleneck=8, phm_n=2, dropout=0.0, discard=discard, normalize=False)
        head_cfg = HeadConfig(pooling="cls", dropout=0.0)
        net = PromptSupernet(backbone, prompt, build_head(backbone, head_cfg, labels), head_cfg, labels)
        with torch.no_grad():
            net.gates.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
        net.train()
        cases = {
            "full": {},
            "masked": {"arch_mask": torch.tensor([0.0, 1.0, 1.0, 0.0])},
            "rows": {"arch_mask": torch.tensor([[1.0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])},
            "hard": {"arch_mask": torch.tensor([0.0, 1.0, 0.0, 1.0]), "hard_gates": True},
        }
        for name, kwargs in cases.items():
            net.zero_grad(set_to_none=True)
            result = net(batch, **kwargs)
            loss = torch.nn.functional.cross_entropy(result.logits, target) + result.representation.pow(2).mean()
            loss.backward()
            key = f"supernet.d{int(discard)}.{name}"
            out[f"{key}.logits"] = result.logits.detach().clone()
            out[f"{key}.representation"] = result.representation.detach().clone()
            out.update(per_layer_grads(net, key))
        # the consistency pair (masked + full as one batch of 2B)
        net.zero_grad(set_to_none=True)
        full, masked = net.forward_consistency(batch, torch.tensor([1.0, 0.0, 1.0, 0.0]))
        loss = torch.nn.functional.cross_entropy(full.logits, target) + torch.nn.functional.mse_loss(masked.representation, full.representation)
        loss.backward()
        key = f"supernet.d{int(discard)}.consistency"
        out[f"{key}.full_logits"] = full.logits.detach().clone()
        out[f"{key}.masked_representation"] = masked.representation.detach().clone()
        out.update(per_layer_grads(net, key))
        # the sparse model at layers [0, 2, 3], initialised from the supernet's generators
        for layers in ([0, 2, 3], [1], [3]):
            sparse = SparsePromptModel(backbone, prompt, build_head(backbone, head_cfg, labels), head_cfg, labels, layers)
            sparse.load_generators_from(net)
            sparse.train()
            result = sparse(batch)
            loss = torch.nn.functional.cross_entropy(result.logits, target)
            loss.backward()
            key = f"sparse.d{int(discard)}.{'-'.join(map(str, layers))}"
            out[f"{key}.logits"] = result.logits.detach().clone()
            out[f"{key}.representation"] = result.representation.detach().clone()
            out.update(per_layer_grads(sparse, key))
    return out


def main() -> None:
    from safetensors.torch import save_file

    from search.cli import main as spt

    work = Path(tempfile.mkdtemp(prefix="spt-reference-"))
    try:
        model_dir = make_tiny_model(work / "bert", "bert", legacy_tokenizer=True)
        for dropout, name in ((0.0, "search-gates-nodropout.csv"),):
            config = write_search_inputs(work / f"d{dropout}", model_dir, dropout)
            run = work / f"run-{dropout}"
            assert spt(["search", str(config), "--out", str(run), "--quiet"]) == 0
            shutil.copy(run / "gates.csv", HERE / name)
        (HERE / "search-config.yaml").write_text(
            "# The search behind search-gates*.csv (dropout 0.1 and 0.0); backbone and data_dir are filled in by the test.\n"
            + yaml.safe_dump(SEARCH, sort_keys=False)
        )
        tensors = model_cases(model_dir)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(HERE / "model-reference.safetensors"),
                  metadata={"made_at_commit": "0c9a67b", "torch": torch.__version__})
        print(f"{len(tensors)} reference tensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
