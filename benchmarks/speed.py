"""What a training step costs a GPU, measured side by side in one run and reported as ratios.

For each backbone, batch and sequence length it builds, on the same frozen backbone:

* floor        - frozen backbone forward + backward with input gradients only;
* sparse       - a sparse SPT training step at K=3 (layers 0, L/2, L-1: the backward pass
                 reaches every layer, the worst case for K=3);
* supernet     - a supernet weight step with the consistency loss (two passes as one batch);
* gate         - a gate (architecture) step;
* PEFT prefix and prompt tuning training steps at the same prompt length;
* inference    - sparse model vs bare backbone forward.

Each is counted with torch.profiler on any device (:mod:`search.profiling`): **kernels**
per step (compute operators; a fused/multi-tensor operator once) and **host-device
syncs** per step, as ratios to the floor and to PEFT prefix; **graph breaks** of the
sparse and supernet forward under ``torch.compile`` (``torch._dynamo.explain``). With
``--time`` the steps are also timed (median of ``--repeats`` after ``--warmup``,
interleaved) and their peak memory measured (CUDA peak allocation, or on a CPU the bytes
autograd saves for backward). Optimizers are fused, as the trainer makes them on a GPU.
On a CUDA device the launches and syncs are also *measured* (torch.profiler's device
activity, CUDA's sync debug mode), the check of the count. ``--compile`` (with ``--time``)
also times the floor and the sparse step under ``runtime.compile: step`` (CUDA graphs on a GPU).

    python benchmarks/speed.py                                   # MiniLM-L6 and a 24 x 1024 BERT, b8 x 64, fp32
    python benchmarks/speed.py --precision bf16 --time           # real bf16: backbone stored in bf16, autocast
    python benchmarks/speed.py --backbones minilm-l6 bert-24x1024 --batches 32 --lengths 128 \
        --precision fp32 bf16 --time --no-breaks                 # on a GPU (add --compile for compiled steps)

Results go to ``benchmarks/results/speed/`` with the device, dtype, versions and date.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from search.baselines import build_baseline  # noqa: E402
from search.config import RetrainConfig, SearchConfig  # noqa: E402
from search.feed import Feed, Precision  # noqa: E402
from search.losses import search_loss  # noqa: E402
from search.profiling import count_ops, device_counts, graph_breaks  # noqa: E402
from search.steps import compiled  # noqa: E402
from search.trainer import Trainer  # noqa: E402
from spt import Backbone, HeadConfig, PromptConfig, PromptSupernet, SparsePromptModel, build_head, load_backbone  # noqa: E402
from spt.inputs import EncodedSplit, collate  # noqa: E402

LABELS = ["0", "1"]
PROMPT_LENGTH = 10
OUT = REPO / "benchmarks" / "results" / "speed"


def random_bert(layers: int, hidden: int, heads: int, dtype: torch.dtype) -> Backbone:
    """A randomly initialised BERT of the given shape (e.g. 24 x 1024: BERT-large)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=512)
    return Backbone(BertModel(config).to(dtype), name=f"bert-{layers}x{hidden}")


def get_backbone(name: str, dtype: torch.dtype) -> Backbone:
    if name.startswith("bert-") and "x" in name:
        layers, hidden = (int(x) for x in name[len("bert-"):].split("x"))
        return random_bert(layers, hidden, hidden // 64, dtype)
    return load_backbone(name, dtype=dtype)


def encoded(batch_size: int, length: int, vocab: int) -> EncodedSplit:
    """A split of ``batch_size`` random sequences of ``length`` tokens (no padding)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), min(vocab, 20000), (batch_size, length), generator=g)
    return EncodedSplit([r.tolist() for r in ids], None, [i % 2 for i in range(batch_size)], None, 0)


class Steps:
    """The measured calls on one backbone, batch size and length, as zero-argument functions."""

    def __init__(self, backbone: Backbone, name: str, batch_size: int, length: int, device: torch.device, precision: str,
                 compile_step: bool = False) -> None:
        split = encoded(batch_size, length, backbone.config.vocab_size)
        self.indices = list(range(batch_size))
        self.batch = collate(split, self.indices, device, PROMPT_LENGTH, Precision(precision).autocast_dtype)
        cfg, head_cfg = PromptConfig(length=PROMPT_LENGTH), HeadConfig(pooling="mean")
        L = backbone.num_layers
        torch.manual_seed(0)
        self.supernet = PromptSupernet(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS)
        self.sparse = SparsePromptModel(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS, [0, L // 2, L - 1])

        def trainer(model, settings, frozen_cache_mb: float = 0, **kwargs) -> Trainer:
            feed = Feed(model, split, device, precision, frozen_cache_mb)
            return Trainer(model, settings, feed, seed=0, fused_optimizer=True, **kwargs)

        self.trainers = {
            "sparse": trainer(self.sparse, RetrainConfig()),
            "supernet": trainer(self.supernet, SearchConfig(), loss=search_loss(1.0, 0.5, 0, L)),
        }
        for method in ("peft-prefix", "peft-prompt"):
            if method == "peft-prefix" and backbone.config.model_type == "mpnet":
                continue  # PEFT prefix tuning cannot serve MPNet
            model = build_baseline(method, name, 2, "mean", 0.1, PROMPT_LENGTH, target_params=1, backbone=backbone)
            self.trainers[method] = trainer(model, RetrainConfig())
        if compile_step:  # runtime.compile: step (CUDA graphs on a GPU)
            self.trainers["sparse-compiled"] = trainer(self.sparse, RetrainConfig(), compile_step=True)
        # the last three layers (what the gates mostly pick), without and with the states below them kept
        self.top = SparsePromptModel(backbone, cfg, build_head(backbone, head_cfg, LABELS), head_cfg, LABELS, [L - 3, L - 2, L - 1])
        self.trainers["top"] = trainer(self.top, RetrainConfig())
        self.trainers["top-kept"] = trainer(self.top, RetrainConfig(), frozen_cache_mb=1024)
        self.kept_batch = self.trainers["top-kept"].feed.batch(split, self.indices)
        for key, made in self.trainers.items():  # every step (the gate step too) sees the same, already made batch
            fixed = self.kept_batch if key == "top-kept" else self.batch
            made.feed.local_batch = lambda indices, b=fixed: (b, 1.0)
        self.backbone, self.precision = backbone, precision

    def functions(self) -> dict[str, Callable[[], object]]:
        t, b, backbone = self.trainers, self.batch, self.backbone
        autocast = t["sparse"].feed.autocast

        def floor():
            with autocast():
                emb = backbone.embed(b["input_ids"]).detach().requires_grad_(True)
                out = backbone.base.encoder(emb).last_hidden_state
            out.float().mean().backward()

        def infer_bare():
            with torch.inference_mode(), autocast():
                backbone.base.encoder(backbone.embed(b["input_ids"]))

        def infer_sparse():
            self._infer(self.sparse, b)

        fns = {"floor": floor, "sparse": lambda: t["sparse"].weight_step(self.indices, 0),
               "supernet": lambda: t["supernet"].weight_step(self.indices, 1),
               "gate": lambda: t["supernet"].architect.step(self.indices, 1)}
        for method in ("peft-prefix", "peft-prompt"):
            if method in t:
                fns[method] = lambda m=method: t[m].weight_step(self.indices, 0)
        fns["infer_bare"], fns["infer_sparse"] = infer_bare, infer_sparse
        for key, batch in (("top", b), ("top-kept", self.kept_batch)):
            fns[key] = lambda k=key: t[k].weight_step(self.indices, 0)
            fns[f"infer_{key}"] = lambda batch=batch: self._infer(self.top, batch)
        return fns

    def _infer(self, model, batch) -> None:
        with torch.inference_mode(), self.trainers["sparse"].feed.autocast():
            model.eval()(batch)

    def compiled_functions(self) -> dict[str, Callable[[], object]]:
        """The frozen floor and the sparse step under ``runtime.compile: step``."""
        b, backbone, autocast = self.batch, self.backbone, self.trainers["sparse"].feed.autocast
        floor_loss = compiled(lambda emb: {"loss": backbone.base.encoder(emb).last_hidden_state.float().mean()}, b["input_ids"].device)

        def floor():
            with autocast():
                loss = floor_loss(backbone.embed(b["input_ids"]).detach().requires_grad_(True))["loss"]
            loss.backward()

        return {"floor-compiled": floor, "sparse-compiled": lambda: self.trainers["sparse-compiled"].weight_step(self.indices, 0)}

    def breaks(self) -> dict[str, int]:
        """Graph breaks of the sparse and the supernet forward + loss under torch.compile."""
        labels, autocast = self.batch["labels"], self.trainers["sparse"].feed.autocast

        def sparse_loss(batch):
            with autocast():
                return torch.nn.functional.cross_entropy(self.sparse(batch).logits.float(), labels)

        def supernet_loss(batch):
            mask = [float(j % 2 == 0) for j in range(len(self.supernet.layers))]  # as the loss samples it: host values
            with autocast():
                full, masked = self.supernet.forward_consistency(batch, mask)
                return torch.nn.functional.cross_entropy(full.logits.float(), labels) + (masked.representation - full.representation).pow(2).mean()

        return {"sparse": graph_breaks(sparse_loss, self.batch), "supernet": graph_breaks(supernet_loss, self.batch)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timings(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved, so machine noise hits every step alike
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device, aside: torch.nn.Module | None = None) -> float:
    """MB: CUDA peak allocation of one call, or on a CPU the bytes autograd saves for backward
    (less ``aside``'s parameters where given: an fp32 linear layer keeps its weight for the input
    gradient, which it holds anyway)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() / 2**20
    seen, total = {p.untyped_storage().data_ptr() for p in aside.parameters()} if aside is not None else set(), [0]

    def pack(tensor: torch.Tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 2**20


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


STEPS = ("floor", "sparse", "supernet", "gate", "peft-prefix", "peft-prompt")


def _per_step(fns: dict[str, Callable[[], object]], counter: Callable) -> dict:
    """``counter(fn)`` for every step, in the search's order (a gate step follows a weight
    step); inference is run once first, so it reuses the weights built after the last update."""
    counts = {}
    for key, fn in fns.items():
        if key.startswith("infer"):
            fn()
        counts[key] = counter(fn)
    return counts


def _count_cells(n: dict[str, int]) -> str:
    """Per-step counts, their ratios and the inference pair, as table cells."""
    return (f"{' / '.join(str(n.get(key, 'n/a')) for key in STEPS)} | {_ratio(n['sparse'], n['floor'])} | "
            f"{_ratio(n['sparse'], n.get('peft-prefix'))} | {_ratio(n['supernet'], n['sparse'])} | "
            f"{n['infer_bare']} / {n['infer_sparse']}")


def measure(name: str, batch_size: int, length: int, device: torch.device, precision: str, args) -> dict[str, list[str]]:
    """One backbone, batch and precision: its rows of the counted, the device-measured and the timed tables."""
    backbone = get_backbone(name, Precision(precision).backbone_dtype).to(device)
    steps = Steps(backbone, name, batch_size, length, device, precision, compile_step=args.compile)
    fns = steps.functions()
    for fn in fns.values():
        fn()  # warm up: lazy initialisation is not a step's cost
    counts = _per_step(fns, count_ops)
    k = {key: c.kernels for key, c in counts.items()}
    breaks = steps.breaks() if args.breaks else {"sparse": "-", "supernet": "-"}
    head = f"| {name} | {batch_size}x{length} | {precision} |"
    rows: dict[str, list[str]] = {"counted": [
        f"{head} {_count_cells(k)} ({_ratio(k['infer_sparse'], k['infer_bare'])}) | "
        f"{' / '.join(str(counts[key].syncs) for key in STEPS[:4])} | {breaks['sparse']} / {breaks['supernet']} |"],
        "kept": [f"{head} {k['floor']} / {k['top']} / {k['top-kept']} | {_ratio(k['top'], k['floor'])} / "
                 f"{_ratio(k['top-kept'], k['floor'])} | {k['infer_bare']} / {k['infer_top']} / {k['infer_top-kept']} | "
                 f"{_ratio(k['infer_top'], k['infer_bare'])} / {_ratio(k['infer_top-kept'], k['infer_bare'])} |"],
        "device": [], "timed": []}
    if device.type == "cuda":  # the counter's check: what the device really launched
        try:
            measured = _per_step(fns, device_counts)
            rows["device"].append(f"{head} {_count_cells({key: c.launches for key, c in measured.items()})} | "
                                  f"{' / '.join(str(measured[key].syncs) for key in STEPS[:4])} |")
        except Exception as error:  # a benchmark row lost is no reason to lose the others
            print(f"device counts failed: {error!r}", file=sys.stderr)
    if args.time:
        if args.compile:
            fns.update(steps.compiled_functions())
            for key in ("floor-compiled", "sparse-compiled"):
                for _ in range(3):  # compiles, records the CUDA graph, replays
                    fns[key]()
        med = timings(fns, args.repeats, args.warmup, device)
        mem = {key: peak_memory(fns[key], device) for key in ("floor", "sparse", "supernet", "peft-prefix") if key in fns}
        compiled_ratios = (f"{_ratio(med['sparse-compiled'], med['floor'])} / {_ratio(med['sparse-compiled'], med['floor-compiled'])}"
                           if args.compile else "-")
        rows["kept"][0] += f" {_ratio(med['top'], med['floor'])} / {_ratio(med['top-kept'], med['floor'])} |"
        rows["timed"].append(
            f"{head} {1000 * med['floor']:.1f} | {_ratio(med['sparse'], med['floor'])} | "
            f"{_ratio(med['sparse'], med.get('peft-prefix'))} | {_ratio(med['supernet'], med['sparse'])} | "
            f"{_ratio(med['infer_bare'], med['infer_sparse'])} | {compiled_ratios} | "
            + " / ".join(f"{mem[key]:.0f}" if key in mem else "n/a" for key in ("floor", "sparse", "supernet", "peft-prefix")) + " |")
    return rows


def environment(device: torch.device) -> str:
    import transformers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["minilm-l6", "bert-24x1024"],
                        help="aliases, model directories, or bert-<layers>x<hidden> (random init)")
    parser.add_argument("--batches", nargs="+", type=int, default=[8])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--time", action="store_true", help="also time the steps and measure their memory")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-breaks", dest="breaks", action="store_false", help="skip the torch.compile graph-break count")
    parser.add_argument("--compile", action="store_true", help="with --time: also time the floor and the sparse step "
                        "under runtime.compile: step (CUDA graphs on a GPU)")
    parser.add_argument("--out", type=Path, help="Markdown file (default: benchmarks/results/speed/speed-<device>.md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    tables: dict[str, list[str]] = {"counted": [], "kept": [], "device": [], "timed": []}
    for name in args.backbones:
        for precision in args.precision:
            for b in args.batches:
                for t in args.lengths:
                    rows = measure(name, b, t, device, precision, args)
                    for table, lines in rows.items():
                        tables[table] += lines
                        print("\n".join(lines), flush=True)
    text = [f"# SPT step cost on {device.type}", "", f"Measured on {environment(device)}.", "",
            f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`", "",
            "Kernels per step (compute operators; what is one kernel on a GPU once: a GEMM, layer norm, flash attention, "
            "reduction, dropout, fused or multi-tensor operator, rms_norm and its backward) and host-device syncs per step, "
            "counted with torch.profiler (`search/profiling.py`); graph breaks of the forward + loss under torch.compile.", "",
            "| backbone | batch | dtype | kernels floor / sparse / supernet / gate / PEFT prefix / PEFT prompt | sparse / floor | "
            "sparse / PEFT prefix | supernet / sparse | inference kernels bare / sparse | syncs floor / sparse / supernet / gate | "
            "graph breaks sparse / supernet |", "|---|---|---|---|---|---|---|---|---|---|", *tables["counted"]]
    text += ["", "The sparse model on the last three layers (what the search mostly picks): its step and inference "
             "computing every layer, and reading the states below its first prompt layer kept per example "
             "(`runtime.frozen_cache_mb`, `search/frozen.py`), against the floor and the bare model" +
             (" (and in wall time)" if args.time else "") + ":", "",
             "| backbone | batch | dtype | kernels floor / top-3 step / with kept states | step / floor, kept | "
             "inference kernels bare / top-3 / kept | inference / bare, kept |" + (" time step / floor, kept |" if args.time else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.time else ""), *tables["kept"]]
    if tables["device"]:
        text += ["", "Measured on the device (the counter's check): launches per step (kernels, copies and fills, "
                 "torch.profiler's CUDA activity) and syncs (`torch.cuda.set_sync_debug_mode`):", "",
                 "| backbone | batch | dtype | launches floor / sparse / supernet / gate / PEFT prefix / PEFT prompt | "
                 "sparse / floor | sparse / PEFT prefix | supernet / sparse | inference bare / sparse | "
                 "syncs floor / sparse / supernet / gate |", "|---|---|---|---|---|---|---|---|---|", *tables["device"]]
    if tables["timed"]:
        text += ["", f"Wall time (median of {args.repeats} after {args.warmup}, interleaved) and memory "
                 f"({'CUDA peak allocation' if device.type == 'cuda' else 'bytes saved for backward'}, MB); "
                 "compiled: `runtime.compile: step` (CUDA graphs on a GPU) against the eager and the compiled floor:", "",
                 "| backbone | batch | dtype | floor ms | sparse / floor | sparse / PEFT prefix | supernet / sparse | "
                 "inference throughput sparse / bare | compiled sparse / floor, / compiled floor | "
                 "memory floor / sparse / supernet / prefix |",
                 "|---|---|---|---|---|---|---|---|---|---|", *tables["timed"]]
    out = args.out or OUT / f"speed-{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
