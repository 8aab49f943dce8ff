"""Trainable parameters of the supernet and of K-layer sparse models, and the supernet's
forward time next to the bare backbone's, measured side by side in one run.

    python benchmarks/model_cost.py                       # MiniLM-L6 and MPNet-base
    python benchmarks/model_cost.py --backbones minilm-l6 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parameter_table(backbone_names: list[str], k: int, length: int, bottleneck: int, labels: int) -> list[str]:
    lines = [f"| backbone | layers | d | PHM n | supernet params | K={k} sparse params | sparse / supernet |", "|---|---|---|---|---|---|---|"]
    names = [str(i) for i in range(labels)]
    for name in backbone_names:
        backbone = load_backbone(name)
        head_cfg = HeadConfig()
        for n in (4, 1):
            cfg = PromptConfig(length=length, bottleneck=bottleneck, phm_n=n)
            supernet = PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, names), head_cfg, names)
            layers = list(range(k))
            sparse = SparsePromptModel(backbone, cfg, build_head(backbone, head_cfg, names), head_cfg, names, layers)
            s, p = supernet.num_trainable_parameters(), sparse.num_trainable_parameters()
            lines.append(f"| {name} | {backbone.num_layers} | {backbone.hidden_size} | {n} | {s:,} | {p:,} | {p / s:.3f} |")
    return lines


def forward_table(name: str, batch_size: int, seq_len: int, repeats: int) -> list[str]:
    backbone = load_backbone(name)
    head_cfg = HeadConfig()
    torch.manual_seed(0)
    supernet = PromptSupernet(backbone, PromptConfig(), build_head(backbone, head_cfg, ["0", "1"]), head_cfg, ["0", "1"])
    ids = torch.randint(1000, 20000, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def bare():
        with torch.inference_mode():
            backbone.base(input_ids=ids, attention_mask=batch["attention_mask"])

    def prompted():
        with torch.inference_mode():
            supernet.eval()(batch)

    def bare_train():
        embeds = backbone.base.embeddings.word_embeddings(ids).detach().requires_grad_(True)
        backbone.base(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state.sum().backward()

    def prompted_train():
        supernet.train()(batch).logits.sum().backward()

    t_bare, t_prompted = median_seconds(bare, repeats), median_seconds(prompted, repeats)
    t_bare_train, t_prompted_train = median_seconds(bare_train, repeats), median_seconds(prompted_train, repeats)
    return [
        f"| measurement ({name}, batch {batch_size}, length {seq_len}, {torch.get_num_threads()} threads) | bare backbone | supernet | ratio |",
        "|---|---|---|---|",
        f"| forward (inference) | {t_bare * 1000:.0f} ms | {t_prompted * 1000:.0f} ms | {t_prompted / t_bare:.2f}x |",
        f"| forward + backward (input gradients for the backbone) | {t_bare_train * 1000:.0f} ms | {t_prompted_train * 1000:.0f} ms | {t_prompted_train / t_bare_train:.2f}x |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6", "mpnet-base"])
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--length", type=int, default=10)
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"Trainable parameters (l={args.length}, m={args.bottleneck}, {args.labels}-way classifier head, gates included in the supernet):")
    print("\n".join(parameter_table(args.backbones, args.k, args.length, args.bottleneck, args.labels)))
    print()
    print("\n".join(forward_table(args.backbones[0], args.batch_size, args.seq_len, args.repeats)))


if __name__ == "__main__":
    main()
