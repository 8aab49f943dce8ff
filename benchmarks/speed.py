"""Speed and memory of SPT, measured side by side in one run and reported as ratios.

For each backbone, batch size and sequence length (median of --repeats timings after
--warmup runs, all measurements interleaved so machine noise hits them alike):

* floor      - frozen backbone forward + backward with input gradients only;
* sparse     - a sparse SPT training step at K=3 (layers 0, L/2, L-1: the backward pass
               reaches every layer, the worst case for K=3);  target <= 1.15x floor;
* supernet   - a supernet training step with the consistency loss (two passes);
               target <= 2.2x sparse;
* gate       - a gate (architecture) step;
* PEFT prefix and prompt tuning training steps at the same prompt length;
               target: sparse no slower than PEFT prefix;
* inference  - sparse model vs bare backbone throughput;
* memory     - peak CUDA memory on a GPU; on CPU the bytes autograd saves for backward
               (activation memory - the weights are shared by all);
* scaling    - supernet step time and parameters against the number of candidate layers
               (tiny BERTs with 4, 8, 16, 24 layers; target linear) and against PHM n.

    python benchmarks/speed.py                 # MiniLM and MPNet, batch 16/32, length 64/128
    python benchmarks/speed.py --quick         # MiniLM, batch 16, length 64, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from search.baselines import build_baseline  # noqa: E402
from search.trainer import OptimSettings, Trainer  # noqa: E402
from spt import HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone  # noqa: E402

LABELS = ["0", "1"]


class SavedBytes:
    """Bytes of tensors autograd saves for the backward pass (CPU activation memory)."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    def __enter__(self):
        def pack(t: torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in self._seen:
                self._seen.add(key)
                self.total += t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def measure_memory(fn, device: torch.device) -> float:
    """Peak MB of one call: CUDA peak allocation, or bytes saved for backward on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    with SavedBytes() as saved:
        fn()
    return saved.total / 2**20


def interleaved_medians(fns: dict[str, callable], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def make_batch(vocab: int, batch: int, length: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 20000), (batch, length), generator=g)  # skip special tokens
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (batch,), generator=g).to(device)}


def build_models(backbone, device, length: int = 10):
    cfg, head_cfg = PromptConfig(length=length), HeadConfig(pooling="mean")
    torch.manual_seed(0)
    L = backbone.num_layers
    supernet = PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)
    sparse = SparsePromptModel(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS, [0, L // 2, L - 1])
    sup_trainer = Trainer(supernet, OptimSettings(), seed=0, device=device)
    sparse_trainer = Trainer(sparse, OptimSettings(), seed=0, device=device)
    return supernet, sparse, sup_trainer, sparse_trainer


def peft_step(method: str, name: str, length: int, device):
    model = build_baseline(method, name, 2, "mean", 0.1, length, target_params=1).to(device)
    trainer = Trainer(model, OptimSettings(), seed=0, device=device)
    return trainer


def _step_functions(backbone, batch, sparse, sparse_trainer, sup_trainer, prompt, prefix, autocast) -> dict:
    """The measured calls for one batch, keyed by name."""
    embeddings = backbone.base.embeddings.word_embeddings

    def floor():
        with autocast:
            emb = embeddings(batch["input_ids"]).detach().requires_grad_(True)
            out = backbone.base(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
        out.float().mean().backward()

    def step(trainer, kind="omega"):
        def fn():
            with autocast:
                (trainer.omega_step if kind == "omega" else trainer.arch_step)(batch, 0)
        return fn

    def infer_bare():
        with torch.inference_mode(), autocast:
            backbone.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    def infer_sparse():
        with torch.inference_mode(), autocast:
            sparse.eval()(batch)

    fns = {"floor": floor, "sparse": step(sparse_trainer), "supernet": step(sup_trainer), "gate": step(sup_trainer, "arch"),
           "peft_prompt": step(prompt)}
    if prefix is not None:
        fns["peft_prefix"] = step(prefix)
    fns["infer_bare"], fns["infer_sparse"] = infer_bare, infer_sparse
    return fns


def grid_rows(name: str, batches: list[int], lengths: list[int], repeats: int, warmup: int, device, precision: str,
              compile_layers: bool = False) -> list[str]:
    backbone = load_backbone(name).to(device)
    if compile_layers:
        backbone.compile_layers()  # the floor runs the same compiled layers
    supernet, sparse, sup_trainer, sparse_trainer = build_models(backbone, device)
    prefix = peft_step("peft-prefix", name, 10, device) if backbone.config.model_type != "mpnet" else None
    prompt = peft_step("peft-prompt", name, 10, device)
    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for b in batches:
        for t in lengths:
            batch = make_batch(backbone.config.vocab_size, b, t, device)
            fns = _step_functions(backbone, batch, sparse, sparse_trainer, sup_trainer, prompt, prefix, autocast)
            med = interleaved_medians(fns, repeats, warmup, device)
            mem = {k: measure_memory(fns[k], device) for k in ("floor", "sparse", "supernet", "gate", "peft_prompt", "peft_prefix") if k in fns}
            pre = med.get("peft_prefix")
            vs_prefix = "n/a" if pre is None else f"{med['sparse'] / pre:.2f}"
            prefix_mem = "n/a" if "peft_prefix" not in mem else f"{mem['peft_prefix']:.0f}"
            rows.append(
                f"| {name} | {b} | {t} | {1000 * med['floor']:.0f} | {med['sparse'] / med['floor']:.2f} | "
                f"{med['supernet'] / med['sparse']:.2f} | {med['gate'] / med['sparse']:.2f} | "
                f"{vs_prefix} | {med['sparse'] / med['peft_prompt']:.2f} | "
                f"{med['infer_bare'] / med['infer_sparse']:.2f} | "
                f"{mem['floor']:.0f} / {mem['sparse']:.0f} / {mem['supernet']:.0f} / {mem['gate']:.0f} / "
                f"{mem['peft_prompt']:.0f} / {prefix_mem} |"
            )
            print(rows[-1], flush=True)
    return rows


def scaling_rows(repeats: int, warmup: int, device) -> list[str]:
    """Supernet step on tiny random BERTs with 4..24 layers and with PHM n = 1..8."""
    import tempfile

    from transformers import BertConfig, BertModel

    rows = []
    batch = None
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for layers in (4, 8, 16, 24):
            path = Path(tmp) / f"bert{layers}"
            torch.manual_seed(0)
            BertModel(BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4,
                                 intermediate_size=256, max_position_embeddings=130)).save_pretrained(path)
            _copy_tokenizer(path)
            backbone = load_backbone(str(path)).to(device)
            head_cfg = HeadConfig()
            for n in ((1, 2, 4, 8) if layers == 8 else (4,)):
                cfg = PromptConfig(length=10, bottleneck=64, phm_n=n)
                torch.manual_seed(0)
                net = PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)
                trainer = Trainer(net, OptimSettings(), seed=0, device=device)
                batch = make_batch(1000, 16, 64, device)
                med = interleaved_medians({"s": lambda t=trainer, b=batch: t.omega_step(b, 0)}, repeats, warmup, device)["s"]
                results.append((layers, n, med, net.num_trainable_parameters()))
        base = next(r for r in results if r[0] == 4 and r[1] == 4)
        rows.append("| candidate layers | PHM n | supernet step (ms) | per layer (ms) | time / 4-layer time | trainable params | params / 4-layer params |")
        rows.append("|---|---|---|---|---|---|---|")
        for layers, n, med, params in results:
            rows.append(f"| {layers} | {n} | {1000 * med:.1f} | {1000 * med / layers:.2f} | {med / base[2]:.2f} | {params:,} | {params / base[3]:.2f} |")
    return rows


def _copy_tokenizer(path: Path) -> None:
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]) + "\n")
    from transformers import BertTokenizerFast

    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="*", default=["minilm-l6", "mpnet-base"], help="none: only the scaling table")
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone layers (runtime.compile)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.backbones, args.batches, args.lengths, args.repeats, args.warmup = ["minilm-l6"], [16], [64], 3, 1
    device = torch.device(args.device)
    compiled = ", torch.compile" if args.compile else ""
    print(f"# SPT speed on {device} ({torch.get_num_threads()} threads, {args.precision}{compiled}); "
          f"median of {args.repeats} after {args.warmup} warm-up\n")
    print("| backbone | batch | length | floor ms | sparse / floor | supernet / sparse | gate / sparse | sparse / PEFT prefix | "
          "sparse / PEFT prompt | sparse inference throughput / bare | memory MB floor / sparse / supernet / gate / prompt / prefix |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.backbones:
        grid_rows(name, args.batches, args.lengths, args.repeats, args.warmup, device, args.precision, args.compile)
    if not args.no_scaling:
        print()
        print("\n".join(scaling_rows(args.repeats, args.warmup, device)))


if __name__ == "__main__":
    main()
