"""Before/after ratios of each speed change, measured side by side in one run.

Each row times the current code ("after") against the same step with one change undone
("before"), interleaved, median of --repeats after --warmup:

* batched consistency passes: one forward of 2B (full + masked) vs two forwards of B;
* pooling before the down projection vs projecting every token first;
* unread prompt slots as keys/values only vs full layers for them;
* frozen backbone weights without gradients vs weights that autograd tracks;
* evaluation under ``torch.inference_mode`` vs ``torch.no_grad``.

    python benchmarks/ablations.py                   # MiniLM-L6, batch 16, length 64 and 128
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import spt.model as spt_model  # noqa: E402
from benchmarks.speed import interleaved_medians, make_batch  # noqa: E402
from search.trainer import OptimSettings, Trainer  # noqa: E402
from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone  # noqa: E402
from spt.generator import PromptGenerator  # noqa: E402

LABELS = ["0", "1"]


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def project_then_pool(self, hidden, pool_weights):
    """The generator as first written: project every token, then pool."""
    return self.dropout(self.up(self.act(torch.bmm(pool_weights.to(hidden.dtype), self.down(hidden)))))


class _Tracked:
    """Backbone weights that autograd tracks (their gradients are computed, then dropped)."""

    def __init__(self, backbone):
        self.backbone = backbone

    def __enter__(self):
        self.backbone.requires_grad_(True)

    def __exit__(self, *exc):
        self.backbone.requires_grad_(False)
        for p in self.backbone.parameters():
            p.grad = None


def _cases(batch, supernet, sparse, sparse_t, mask, backbone) -> list:
    """(change, what is timed, before, after) for one batch."""
    def consistency_two_passes():
        supernet.train()
        full, masked = supernet(batch), supernet(batch, arch_mask=mask)
        loss = nn.functional.cross_entropy(full.logits, batch["labels"]) + nn.functional.mse_loss(masked.representation, full.representation)
        loss.backward()
        supernet.zero_grad(set_to_none=True)

    def consistency_one_pass():
        supernet.train()
        full, masked = supernet.forward_consistency(batch, mask)
        loss = nn.functional.cross_entropy(full.logits, batch["labels"]) + nn.functional.mse_loss(masked.representation, full.representation)
        loss.backward()
        supernet.zero_grad(set_to_none=True)

    def sparse_step():
        sparse_t.omega_step(batch, 0)

    def sparse_step_project_first():
        with patched(PromptGenerator, "forward", project_then_pool):
            sparse_t.omega_step(batch, 0)

    def sparse_step_full_slots():
        with patched(spt_model, "_slot_outputs_unused", lambda *a: False):
            sparse_t.omega_step(batch, 0)

    def sparse_step_tracked():
        with _Tracked(backbone):
            sparse_t.omega_step(batch, 0)

    def eval_inference_mode():
        with torch.inference_mode():
            sparse.eval()(batch)

    def eval_no_grad():
        with torch.no_grad():
            sparse.eval()(batch)

    return [
        ("one 2B pass for the two consistency passes", "supernet fwd+bwd", consistency_two_passes, consistency_one_pass),
        ("pool before the down projection", "sparse K=3 step", sparse_step_project_first, sparse_step),
        ("unread slots as keys/values only", "sparse K=3 step", sparse_step_full_slots, sparse_step),
        ("no gradients for frozen weights", "sparse K=3 step", sparse_step_tracked, sparse_step),
        ("inference_mode for evaluation", "sparse forward", eval_no_grad, eval_inference_mode),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    backbone = load_backbone(args.backbone)
    L = backbone.num_layers
    head_cfg = HeadConfig(pooling="mean")
    torch.manual_seed(0)
    cfg = PromptConfig()
    supernet = PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)
    sparse = SparsePromptModel(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS, [0, L // 2, L - 1])
    sparse_t = Trainer(sparse, OptimSettings(), seed=0)
    mask = torch.tensor([1.0, 0, 1, 0, 1, 0][:L] + [0.0] * max(0, L - 6))
    print(f"# Before/after ratios on {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads (median of {args.repeats})\n")
    print("| change | what is timed | length | before ms | after ms | before / after |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        batch = make_batch(backbone.config.vocab_size, args.batch, length, torch.device("cpu"))

        pairs = _cases(batch, supernet, sparse, sparse_t, mask, backbone)
        fns = {}
        for i, (_, _, before, after) in enumerate(pairs):
            fns[f"{i}b"], fns[f"{i}a"] = before, after
        med = interleaved_medians(fns, args.repeats, args.warmup, torch.device("cpu"))
        for i, (change, what, _, _) in enumerate(pairs):
            b, a = med[f"{i}b"], med[f"{i}a"]
            print(f"| {change} | {what} | {length} | {1000 * b:.0f} | {1000 * a:.0f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()
