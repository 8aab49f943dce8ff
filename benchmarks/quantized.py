"""A quantized frozen backbone (``model.quantize``) against the full-precision one, on MiniLM-L6 and SST-2.

For each mode (fp32, then ``int8``, ``nf4``, ``fp4``: bitsandbytes, see ``spt/backbone/quantize.py``):

* **bytes**     - the backbone's parameters and buffers as stored (its layers' linear weights
                  packed, with their scales), and of the layers alone;
* **agreement** - a sparse model (prompts at layers 3, 4, 5) trained ``--steps`` steps on SST-2
                  sentences with the fp32 backbone, its trained prompts and head then run on
                  each backbone over ``--dev`` dev sentences: the largest logit difference from
                  fp32, the share of equal predictions, accuracy; and the same model trained on
                  the quantized backbone itself (its dev accuracy);
* **steps**     - time of a sparse weight step and of a supernet weight step (consistency loss,
                  two passes as one batch) at ``--batch`` x ``--length`` tokens, the median of
                  ``--repeats`` interleaved runs, and the bytes autograd saves for the backward pass
                  (the parameters it keeps aside: they are held anyway).

    python benchmarks/quantized.py                       # 1 thread, results/quantized/quantized-cpu.md
    python benchmarks/quantized.py --device cuda         # on a GPU

A CPU timing is only as quiet as the machine: other processes on its cores slow every mode alike
(the runs are interleaved), so compare the modes within one table.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from speed import encoded, peak_memory, sync, timings  # noqa: E402

from search.config import RetrainConfig, SearchConfig  # noqa: E402
from search.data import Example  # noqa: E402
from search.feed import Feed  # noqa: E402
from search.losses import search_loss  # noqa: E402
from search.trainer import Trainer  # noqa: E402
from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone  # noqa: E402
from spt.backbone.quantize import stored_bytes  # noqa: E402
from spt.inputs import collate, encode_split  # noqa: E402

LABELS = ["0", "1"]
LAYERS = [3, 4, 5]
SST2 = REPO.parent / "shared" / "data" / "SST-2" / "stsa_sentence_level"
OUT = REPO / "benchmarks" / "results" / "quantized"


def sentences(split: str, count: int) -> list[Example]:
    """The first ``count`` sentences of an SST-2 split (``label text`` lines)."""
    rows = (SST2 / f"stsa.binary.{split}").read_text().splitlines()[:count]
    return [Example(text, None, int(label)) for label, text in (row.split(" ", 1) for row in rows)]


def sparse_model(backbone, seed: int = 0) -> SparsePromptModel:
    prompt, head = PromptConfig(), HeadConfig(pooling="mean")
    torch.manual_seed(seed)
    return SparsePromptModel(backbone, prompt, build_head(backbone, head, LABELS), head, LABELS, LAYERS, max_length=64)


def train(model: SparsePromptModel, split, steps: int, batch: int, device: torch.device) -> None:
    """``steps`` weight steps over ``split`` in order (wrapping), the retraining's defaults otherwise."""
    trainer = Trainer(model.to(device), RetrainConfig(), Feed(model, split, device), seed=0)
    for step in range(steps):
        start = step * batch % len(split)
        trainer.weight_step([(start + i) % len(split) for i in range(batch)], step)


@torch.inference_mode()
def logits(model: SparsePromptModel, split, device: torch.device) -> torch.Tensor:
    model.eval()
    rows = [
        model(collate(split, list(range(i, min(i + 64, len(split)))), device, model.prompt_length)).logits.float()
        for i in range(0, len(split), 64)
    ]
    return torch.cat(rows).cpu()


def step_functions(backbone, batch: int, length: int, device: torch.device) -> dict:
    """A sparse and a supernet weight step on one fixed batch of random tokens, and their models."""
    split = encoded(batch, length, backbone.config.vocab_size)
    indices = list(range(batch))
    head = HeadConfig(pooling="mean")
    torch.manual_seed(0)
    sparse = sparse_model(backbone).to(device)
    supernet = PromptSupernet(backbone, PromptConfig(), build_head(backbone, head, LABELS), head, LABELS).to(device)
    trainers = {
        "sparse": Trainer(sparse, RetrainConfig(), Feed(sparse, split, device), seed=0),
        "supernet": Trainer(
            supernet,
            SearchConfig(),
            Feed(supernet, split, device),
            seed=0,
            loss=search_loss(1.0, 0.5, 0, backbone.num_layers),
        ),
    }
    return {name: ((lambda t=t: t.weight_step(indices, 1)), t.model) for name, t in trainers.items()}


def agreement(backbones: dict, train_split, dev_split, steps: int, device: torch.device) -> list[list]:
    """Per backbone: stored bytes (whole, layers), the largest logit change and the share of equal
    predictions of the fp32-trained prompts against fp32, their dev accuracy, and the dev accuracy
    of prompts trained on that backbone."""
    gold = torch.tensor(dev_split.labels)
    reference = sparse_model(backbones["none"])
    train(reference, train_split, steps, 16, device)
    trained = reference.trainable_state_dict()
    rows, fp32 = [], None
    for mode, backbone in backbones.items():
        model = sparse_model(backbone).to(device)
        model.load_state_dict(trained, strict=False)
        scores = logits(model, dev_split, device)
        fp32 = scores if fp32 is None else fp32
        own = sparse_model(backbone)
        train(own, train_split, steps, 16, device)
        accuracy = (scores.argmax(-1) == gold).float().mean().item()
        own_accuracy = (logits(own, dev_split, device).argmax(-1) == gold).float().mean().item()
        same = (scores.argmax(-1) == fp32.argmax(-1)).float().mean().item()
        diff = (scores - fp32).abs().max().item()
        rows.append([mode, stored_bytes(backbone), stored_bytes(backbone.layers), diff, same, accuracy, own_accuracy])
    return rows


def step_costs(backbones: dict, batch: int, length: int, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """Seconds (median, interleaved) and MB kept for backward of each backbone's sparse and supernet step."""
    steps = {
        f"{mode} {name}": step
        for mode, backbone in backbones.items()
        for name, step in step_functions(backbone, batch, length, device).items()
    }
    seconds = timings({name: fn for name, (fn, _) in steps.items()}, repeats, 2, device)
    saved = {name: peak_memory(fn, device, aside=model) for name, (fn, model) in steps.items()}
    sync(device)
    return seconds, saved


def report(args: argparse.Namespace, rows: list[list], seconds: dict, saved: dict, trained_seconds: float) -> str:
    mb, name = 2**20, (lambda mode: "fp32" if mode == "none" else mode)
    lines = [
        f"# Quantized backbone: {args.backbone} on SST-2 ({args.device}, {args.threads} thread(s))",
        "",
        f"`python benchmarks/quantized.py --device {args.device} --threads {args.threads}` - torch {torch.__version__}, "
        f"bitsandbytes {_version('bitsandbytes')}, {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}. Training and scoring took {trained_seconds:.0f} s.",
        "",
        f"Agreement: prompts at layers {LAYERS} and a mean-pooled head trained {args.steps} steps (batch 16) on "
        f"{args.train} SST-2 training sentences with the fp32 backbone, then run on each backbone over {args.dev} dev "
        "sentences; *trained on it*: the same training on that backbone.",
        "",
        "| backbone | stored MB (layers) | x fp32 | max abs logit diff | same prediction | dev accuracy | trained on it |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, total, layers, diff, same, accuracy, own in rows:
        lines.append(
            f"| {name(mode)} | {total / mb:.1f} ({layers / mb:.1f}) | {total / rows[0][1]:.2f} | "
            f"{diff:.4f} | {same:.3f} | {accuracy:.3f} | {own:.3f} |"
        )
    lines += [
        "",
        f"Steps at batch {args.batch} x {args.length} tokens (median of {args.repeats}, interleaved); "
        "saved: the bytes autograd keeps for the backward pass, the parameters it keeps aside.",
        "",
        "| backbone | sparse step ms | supernet step ms | sparse saved MB | supernet saved MB |",
        "|---|---|---|---|---|",
    ]
    for mode, *_ in rows:
        lines.append(
            f"| {name(mode)} | {seconds[f'{mode} sparse'] * 1000:.0f} | {seconds[f'{mode} supernet'] * 1000:.0f} | "
            f"{saved[f'{mode} sparse']:.1f} | {saved[f'{mode} supernet']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--modes", nargs="+", default=["int8", "nf4", "fp4"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train", type=int, default=512, help="SST-2 training sentences")
    parser.add_argument("--dev", type=int, default=256, help="SST-2 dev sentences scored")
    parser.add_argument("--steps", type=int, default=96, help="training steps of each model (batch 16)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbones = {mode: load_backbone(args.backbone, quantize=mode).to(device) for mode in ["none", *args.modes]}
    tokenizer, head = backbones["none"].tokenizer, HeadConfig(pooling="mean")
    train_split, dev_split = (
        encode_split(tokenizer, sentences(split, n), 64, head)
        for split, n in (("train", args.train), ("dev", args.dev))
    )
    started = time.perf_counter()
    rows = agreement(backbones, train_split, dev_split, args.steps, device)
    trained_seconds = time.perf_counter() - started
    seconds, saved = step_costs(backbones, args.batch, args.length, args.repeats, device)
    text = report(args, rows, seconds, saved, trained_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quantized-{device.type}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
