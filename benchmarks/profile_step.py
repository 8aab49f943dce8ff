"""Where a training step's device time goes: the frozen floor, the sparse SPT step and PEFT
prefix tuning, each profiled once on a CUDA device (after three warm-up steps), as
torch.profiler tables sorted by device time. The steps are those of ``benchmarks/speed.py``.

    python benchmarks/profile_step.py                                   # bert-24x1024, b32 x 128, fp32 and bf16
    python benchmarks/profile_step.py --backbone minilm-l6 --precision bf16 --out /tmp/minilm.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402

STEPS = ("floor", "sparse", "peft-prefix")


def profile_step(fn, device: torch.device) -> tuple[float, str]:
    """Device milliseconds of one call of ``fn`` and the profiler's table of it."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    speed.sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        speed.sync(device)
    device_ms = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1000
    return device_ms, prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="bert-24x1024")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=speed.OUT / "gpu-profile.md")
    args = parser.parse_args()
    device = torch.device("cuda")
    text = [f"# Device time of one step: {args.backbone}, batch {args.batch} x {args.length}", "",
            f"Measured on {speed.environment(device)}.", "", f"Command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`"]
    for precision in args.precision:
        backbone = speed.get_backbone(args.backbone, speed.Precision(precision).backbone_dtype).to(device)
        fns = speed.Steps(backbone, args.backbone, args.batch, args.length, device, precision).functions()
        for key in STEPS:
            device_ms, table = profile_step(fns[key], device)
            text += ["", f"## {precision} {key}: device time {device_ms:.1f} ms", "", "```", table, "```"]
            print(text[-4], flush=True)
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
