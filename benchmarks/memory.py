"""Peak memory measured against ``spt estimate``'s, side by side in one run (issue 28).

For each backbone, with ``runtime.activation_checkpointing`` none and prompted, the steps a run
takes, as the trainer takes them (the estimator's own step code, :meth:`search.estimate.Estimator.simulate`,
here on real tensors):

* **search**: the supernet's weight step (with the consistency pass: 2B rows) and its gate step
  (``B x search.arch_batches`` rows); the search's peak is the larger;
* **retrain**: the sparse model's step, K = ``select.k`` layers placed as the estimator places
  them (the lowest candidate, the rest spread up: the most the backward pass can reach);
* **floor**: ``benchmarks/speed.py``'s frozen floor, the bare backbone's forward and backward pass
  for gradients of its input embeddings only (through the adapter's layers, so decoders have one).

Measured on a CPU (real tensors; the optimizer state made before the step, the batch on the device):

* **allocator**: the bytes alive when the step starts plus the highest rise of what the CPU
  allocator reports to torch.profiler (its memory events, every allocation and free) during it;
* **live**: the estimator's counter of live storages, run on the real tensors;
* **saved**: what the issue names: the bytes autograd saves for backward (distinct storages not
  already alive) plus the weights, the optimizer state and the gradients of what trains. It
  misses what ``torch.utils.checkpoint`` keeps in its own closures (each checkpointed layer's
  inputs) and all transients: a lower bound.

On a CUDA device also ``torch.cuda.max_memory_allocated``. The estimate is made on the meta
device (fake tensors) for the device measured. Ratios: estimate / measured (target within 15%)
and the checkpointed supernet's search step / the floor (target at most 1.3).

The recorded H200 peaks of ``benchmarks/speed.py`` (``benchmarks/results/speed/speed-cuda.md``:
its floor, sparse and supernet weight step at 32 x 128, fp32 and bf16) are set against the
estimate of the same steps for a CUDA target, plus the two copies of the backbone speed.py's PEFT
baselines hold.

    python benchmarks/memory.py                       # all four backbones (about an hour on 2 CPU cores)
    python benchmarks/memory.py --cases minilm-l6 --precision fp32 bf16
    python benchmarks/memory.py --fits                 # the README's "Which model fits where" (estimates only)

Backbones without weights are built from the config folders in ``benchmarks/backbones/``
(random init); MiniLM-L6 and SmolLM2-135M load their real weights where installed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from search.config import load_config  # noqa: E402
from search.estimate import CUDA_WORKSPACES, Estimator, LiveMemory  # noqa: E402
from spt.backbone import Backbone, load_backbone  # noqa: E402
from spt.errors import UserError  # noqa: E402
from spt.hub import resolve_model_source  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "memory"
BACKBONES = REPO / "benchmarks" / "backbones"
MB = 2**20


@dataclass(frozen=True)
class Case:
    name: str
    backbone: str  # an alias (real weights) or a folder of benchmarks/backbones (random init)
    config: str  # the run config it is measured with
    batch: int
    length: int


def smollm2() -> str:
    """The installed SmolLM2-135M-Instruct (real weights), else its shape (random init)."""
    try:
        resolve_model_source("smollm2-135m")
        return "smollm2-135m"
    except UserError:
        return str(BACKBONES / "smollm2-135m")


def cases() -> dict[str, Case]:
    sst2, smol = "configs/minilm/sst2.yaml", "configs/smollm2/sst2-16shot.yaml"
    return {
        c.name: c
        for c in [
            Case("minilm-l6", "minilm-l6", sst2, 16, 64),
            Case("bert-24x1024", str(BACKBONES / "bert-24x1024"), sst2, 8, 64),
            Case("smollm2-135m", smollm2(), smol, 8, 64),
            Case("llama-1b", str(BACKBONES / "llama-1b"), smol, 2, 32),
        ]
    }


def real_backbone(name: str, with_lm_head: bool, dtype: torch.dtype) -> Backbone:
    """Real weights where the folder (or alias) has them, else a seeded random init of its config."""
    from transformers import AutoConfig

    from search.estimate import fake_backbone

    source = Path(resolve_model_source(name))
    if any(source.glob("*.safetensors")) or any(source.glob("*.bin")):
        return load_backbone(name, with_lm_head=with_lm_head, dtype=dtype)
    torch.manual_seed(0)
    return fake_backbone(
        AutoConfig.from_pretrained(source), with_lm_head, dtype, name
    )  # (real tensors: no fake mode here)


class Probe:
    """Wraps each step of a real run: the CPU allocator's peak (torch.profiler), the saved-for-backward
    bytes, and on CUDA the allocator's peak."""

    def __init__(self, device: torch.device, trainable_bytes: int = 0) -> None:
        self.device, self.trainable_bytes = device, trainable_bytes
        self.results: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str, memory: LiveMemory):
        from torch.profiler import ProfilerActivity, profile

        start, alive = memory.current, set(memory.live)
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in alive:
                saved.setdefault(storage._cdata, storage.nbytes())
            return tensor

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with (
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            yield
        if cuda:
            torch.cuda.synchronize()
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        rise = peak = 0
        for event in events:
            rise += event.self_cpu_memory_usage
            peak = max(peak, rise)
        self.results[phase] = {
            "allocator": start + peak,
            "live_start": start,
            "saved": start + sum(saved.values()) + (self.trainable_bytes if phase != "floor" else 0),
            **({"cuda": torch.cuda.max_memory_allocated()} if cuda else {}),
        }


def measure(case: Case, precision: str, device: torch.device) -> list[dict]:
    """Every step of one backbone in one precision: estimate and measurements."""
    config = load_config(
        REPO / case.config, [f"model.backbone={case.backbone}", f"search.eval_batch_size={case.batch}"]
    )
    estimator = Estimator(config, "cuda" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    started = time.perf_counter()
    backbone = real_backbone(case.backbone, config.head.verbalizer, dtype).to(device)
    print(f"{case.name}: backbone ready in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    floor_probe = Probe(device)
    floor_estimate = estimator.floor(precision, case.batch, case.length)
    live = estimator.floor(precision, case.batch, case.length, backbone=backbone, device=str(device), probe=floor_probe)
    rows.append(
        {
            "case": case.name,
            "precision": precision,
            "checkpointing": "none",
            "step": "floor",
            "estimate": floor_estimate,
            "live": live,
            **floor_probe.results["floor"],
        }
    )
    for checkpointing in ("none", "prompted"):
        for stage in ("search", "retrain"):
            started = time.perf_counter()
            estimate = estimator.simulate(stage, precision, checkpointing, case.batch, case.length)
            probe = Probe(device, estimate.trainable * 4)
            real = estimator.simulate(
                stage,
                precision,
                checkpointing,
                case.batch,
                case.length,
                backbone=backbone,
                device=str(device),
                probe=probe,
            )
            for phase in ("weight step", "gate step") if stage == "search" else ("weight step",):
                rows.append(
                    {
                        "case": case.name,
                        "precision": precision,
                        "checkpointing": checkpointing,
                        "step": f"{stage} {phase}",
                        "estimate": estimate.phases[phase],
                        "live": real.phases[phase],
                        "layers": estimate.layers,
                        **probe.results[phase],
                    }
                )
            print(f"{case.name} {precision} {checkpointing} {stage}: {time.perf_counter() - started:.0f} s", flush=True)
    for row in rows:
        row.update(batch=case.batch, length=case.length)
        print(json.dumps(row), flush=True)
    del backbone
    return rows


def recorded_h200() -> list[dict]:
    """speed.py's H200 peaks (speed-cuda.md, MiB) against the estimate of the same steps for a CUDA target."""
    recorded = {
        ("minilm-l6", "fp32"): (750, 766, 1230),
        ("minilm-l6", "bf16"): (463, 478, 767),
        ("bert-24x1024", "fp32"): (7943, 8229, 12694),
        ("bert-24x1024", "bf16"): (4434, 4596, 7350),
    }
    rows = []
    for (name, precision), (floor, sparse, supernet) in recorded.items():
        backbone = name if name == "minilm-l6" else str(BACKBONES / name)
        config = load_config(REPO / "configs/minilm/sst2.yaml", [f"model.backbone={backbone}"])
        estimator = Estimator(config, "cuda")
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # speed.py's PEFT prefix and prompt baselines each hold a copy of the backbone (baselines.build_baseline)
        copies = 2 * sum(p.numel() * p.element_size() for p in estimator.backbone(dtype).base.parameters())
        extra = copies + CUDA_WORKSPACES
        estimates = (
            estimator.floor(precision, 32, 128),
            estimator.simulate("retrain", precision, "none", 32, 128).phases["weight step"],
            estimator.simulate("search", precision, "none", 32, 128).phases["weight step"],
        )
        for step, measured, estimate in zip(
            ("floor", "sparse step", "supernet weight step"), (floor, sparse, supernet), estimates
        ):
            rows.append(
                {
                    "case": name,
                    "precision": precision,
                    "step": step,
                    "measured_mib": measured,
                    "estimate_mib": round((estimate + extra) / MB),
                    "ratio": round((estimate + extra) / MB / measured, 3),
                }
            )
    return rows


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def markdown(rows: list[dict], h200: list[dict], command: str, environment: str) -> str:
    cuda = any("cuda" in r for r in rows)
    text = [
        "# Peak memory: measured against `spt estimate`",
        "",
        f"Measured on {environment}.",
        "",
        f"Command: `{command}`",
        "",
        "MiB (2^20 bytes). *allocator*: the CPU allocator's peak during the step (torch.profiler's memory events) "
        "over what was alive when it started (weights, optimizer state, batch); *live*: the estimator's counter of "
        "live storages on the real tensors; *saved*: the bytes saved for backward plus weights, optimizer state and "
        "gradients (a lower bound: it misses checkpoint's kept inputs and every transient)"
        + ("; *CUDA*: torch.cuda.max_memory_allocated" if cuda else "")
        + ". The estimate is the same step on the "
        "meta device (fake tensors), for the device measured.",
        "",
        "| backbone | batch x length | dtype | checkpointing | step | estimate | allocator | live | saved |"
        + (" CUDA |" if cuda else "")
        + " estimate / allocator | estimate / saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for r in rows:
        measured = r.get("cuda") or r["allocator"]
        cells = [
            r["case"],
            f"{r['batch']}x{r['length']}",
            r["precision"],
            r["checkpointing"],
            r["step"],
            f"{r['estimate'] / MB:.0f}",
            f"{r['allocator'] / MB:.0f}",
            f"{r['live'] / MB:.0f}",
            f"{r['saved'] / MB:.0f}",
        ]
        cells += [f"{r['cuda'] / MB:.0f}"] if cuda else []
        cells += [_ratio(r["estimate"], measured), _ratio(r["estimate"], r["saved"])]
        text.append("| " + " | ".join(cells) + " |")
    worst = max((abs(r["estimate"] / (r.get("cuda") or r["allocator"]) - 1) for r in rows), default=0)
    text += ["", f"Largest estimate error against the allocator's peak: {100 * worst:.1f}%.", ""]
    return "\n".join(text + _floor_table(rows) + _h200_table(h200)) + "\n"


def _floor_table(rows: list[dict]) -> list[str]:
    """Each backbone and dtype's checkpointed search step, plain search step and checkpointed retraining
    step against its frozen floor."""
    text = [
        "The checkpointed supernet's search step (the larger of its weight and gate step) against the frozen floor "
        "(no checkpointing), measured (allocator), and the same for the other steps:",
        "",
        "| backbone | dtype | floor | search, checkpointed | / floor | search, plain | / floor | retrain, checkpointed | / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, precision in dict.fromkeys((r["case"], r["precision"]) for r in rows):
        mine = [r for r in rows if r["case"] == case and r["precision"] == precision]

        def peak(checkpointing: str, prefix: str, mine=mine) -> float:
            return max(
                (r.get("cuda") or r["allocator"])
                for r in mine
                if r["checkpointing"] == checkpointing and r["step"].startswith(prefix)
            )

        floor = peak("none", "floor")
        cells = [peak("prompted", "search"), peak("none", "search"), peak("prompted", "retrain")]
        text.append(
            f"| {case} | {precision} | {floor / MB:.0f} | "
            + " | ".join(f"{c / MB:.0f} | {c / floor:.2f}" for c in cells)
            + " |"
        )
    return text


def _h200_table(h200: list[dict]) -> list[str]:
    """The H200 peaks speed.py recorded against the estimate of the same steps (nothing without them)."""
    text: list[str] = []
    if h200:
        text += [
            "",
            "The recorded H200 peaks of `benchmarks/speed.py` (`benchmarks/results/speed/speed-cuda.md`, batch "
            "32 x 128; CUDA peak allocation, with its two PEFT baselines' copies of the backbone alive) against the "
            "estimate of the same steps for a CUDA target (the copies and the cuBLAS workspaces added):",
            "",
            "| backbone | dtype | step | recorded MiB | estimate MiB | estimate / recorded |",
            "|---|---|---|---|---|---|",
        ]
        text += [
            f"| {r['case']} | {r['precision']} | {r['step']} | {r['measured_mib']} | {r['estimate_mib']} | {r['ratio']:.2f} |"
            for r in h200
        ]
    return text


FITS_MODELS = {"SmolLM2-135M": "smollm2-135m", "LLaMA-3.2-1B shape": "llama-1b", "LLaMA-3-8B shape": "llama-8b"}
FITS_MEMORY = {"24 GB": 24 * 10**9, "48 GB": 48 * 10**9, "80 GB": 80 * 10**9}


def line_max_batch(
    estimator: Estimator,
    stage: str,
    precision: str,
    checkpointing: str,
    length: int,
    usable: float,
    points: tuple[int, int],
) -> int:
    """The largest batch under ``usable`` bytes from each phase's line through two batches (a
    phase's peak grows linearly with the batch: every activation has a batch dimension)."""
    low, high = (estimator.peaks(stage, precision, checkpointing, b, length) for b in points)
    extra = estimator.total(low, precision) - low.peak  # (quantized weights, CUDA workspaces)
    best = 1 << 20
    for phase, a in low.phases.items():
        slope = (high.phases[phase] - a) / (points[1] - points[0])
        room = usable - extra - a
        if slope <= 0:
            best = best if room >= 0 else 0
        else:
            best = min(best, points[0] + int(room // slope))
    return max(best, 0)


def fits(length: int = 256, batch: int = 8, long: int = 1024) -> tuple[list[dict], str]:
    """``spt estimate``'s table for three decoder shapes (config.json only): the peak at ``batch`` x
    ``length`` and ``batch`` x ``long`` tokens, and the largest batch of ``length`` tokens on 24, 48
    and 80 GB (10% left free), for a CUDA target; configs/smollm2/sst2-16shot.yaml's method settings.
    The largest batch comes from the lines through ``batch`` and ``2 batch``; the 80 GB bf16 answer
    of each row is checked by simulating it and the next batch."""
    rows = []
    for title, folder in FITS_MODELS.items():
        config = load_config(REPO / "configs/smollm2/sst2-16shot.yaml", [f"model.backbone={BACKBONES / folder}"])
        estimator = Estimator(config, "cuda")
        for stage in ("search", "retrain"):
            for checkpointing in ("none", "prompted"):
                for precision in ("bf16", "nf4"):
                    started = time.perf_counter()
                    row = estimator.row(stage, precision, checkpointing, batch, length)
                    longer = estimator.row(stage, precision, checkpointing, batch, long)
                    largest = {
                        name: line_max_batch(
                            estimator, stage, precision, checkpointing, length, 0.9 * size, (batch, 2 * batch)
                        )
                        for name, size in FITS_MEMORY.items()
                    }
                    check = None
                    if precision == "bf16" and largest["80 GB"] > 0:
                        b, usable = largest["80 GB"], 0.9 * FITS_MEMORY["80 GB"]
                        at, above = (
                            estimator.total(estimator.peaks(stage, precision, checkpointing, n, length), precision)
                            for n in (b, b + 1)
                        )
                        check = {"batch": b, "peak": at, "next_peak": above, "exact": at <= usable < above}
                    rows.append(
                        {
                            "model": title,
                            "stage": stage,
                            "precision": precision,
                            "checkpointing": checkpointing,
                            "params": row.params,
                            "trainable": row.trainable,
                            "layers": row.layers,
                            "peak": row.peak_bytes,
                            "peak_long": longer.peak_bytes,
                            "largest": largest,
                            "check": check,
                        }
                    )
                    print(json.dumps(rows[-1]), f"{time.perf_counter() - started:.0f} s", flush=True)
    text = [
        f"| model | stage | weights | checkpointing | peak GB, {batch} x {length} | peak GB, {batch} x {long} | "
        + " | ".join(f"largest batch x {length} on {name}" for name in FITS_MEMORY)
        + " |",
        "|---|---|---|---|---|---|" + "---|" * len(FITS_MEMORY),
    ]
    for r in rows:
        text.append(
            f"| {r['model']} | {r['stage']} | {r['precision']} | {r['checkpointing']} | {r['peak'] / 10**9:.1f} | "
            f"{r['peak_long'] / 10**9:.1f} | " + " | ".join(f"{r['largest'][n]:,}" for n in FITS_MEMORY) + " |"
        )
    return rows, "\n".join(text) + "\n"


def environment(device: torch.device) -> str:
    import transformers

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    return (
        f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(cases()), default=list(cases()))
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-h200", dest="h200", action="store_false", help="skip the recorded H200 comparison")
    parser.add_argument(
        "--fits",
        action="store_true",
        help="only the estimate's table of which decoder fits where (README), written to fits.md / fits.json",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/memory.py " + " ".join(sys.argv[1:])
    if args.fits:
        rows, table = fits()
        (args.out / "fits.json").write_text(
            json.dumps({"command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n"
        )
        (args.out / "fits.md").write_text(f"# Which model fits where (estimates)\n\nCommand: `{command}`\n\n{table}")
        print(table)
        return
    device = torch.device(args.device)
    rows = []
    for name in args.cases:
        for precision in args.precision:
            rows += measure(cases()[name], precision, device)
    h200 = recorded_h200() if args.h200 else []
    env = environment(device)
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    (args.out / f"memory{suffix}.json").write_text(
        json.dumps({"command": command, "environment": env, "rows": rows, "h200": h200}, indent=1) + "\n"
    )
    (args.out / f"memory{suffix}.md").write_text(markdown(rows, h200, command, env))
    print(markdown(rows, h200, command, env))
    print(f"wrote {args.out / f'memory{suffix}.md'} and .json")


if __name__ == "__main__":
    main()
