"""Comparison reports: per-strategy mean +- std over seeds (Markdown, CSV) and a bar plot."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = [
    "strategy", "seed", "draw", "layers", "dev", "test", "trainable_params",
    "search_steps", "search_seconds", "train_steps", "train_seconds", "note",
]


def write_rows_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})


def read_rows_csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per strategy, in first-seen order: mean and std of dev/test, means of costs."""
    order: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row["strategy"]
        if name not in groups:
            order.append(name)
            groups[name] = []
        groups[name].append(row)
    summary = []
    for name in order:
        group = groups[name]
        dev, dev_sd = _mean_std([float(r["dev"]) for r in group])
        test, test_sd = _mean_std([float(r["test"]) for r in group])
        layer_sets = sorted({str(r["layers"]) for r in group})
        summary.append({
            "strategy": name, "runs": len(group), "dev": dev, "dev_std": dev_sd, "test": test, "test_std": test_sd,
            "trainable_params": statistics.fmean(int(r["trainable_params"]) for r in group),
            "search_steps": statistics.fmean(int(r["search_steps"]) for r in group),
            "search_seconds": statistics.fmean(float(r["search_seconds"]) for r in group),
            "train_seconds": statistics.fmean(float(r["train_seconds"]) for r in group),
            "layers": layer_sets[0] if len(layer_sets) == 1 else f"{len(layer_sets)} distinct",
            "note": "; ".join(sorted({r.get("note", "") for r in group if r.get("note")})),
        })
    return summary


def markdown_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
    lines = [
        f"| strategy | runs | dev {metric} | test {metric} | trainable params | layers | search steps | search s | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['strategy']} | {s['runs']} | {100 * s['dev']:.1f} ± {100 * s['dev_std']:.1f} | "
            f"{100 * s['test']:.1f} ± {100 * s['test_std']:.1f} | {s['trainable_params']:,.0f} | {s['layers']} | "
            f"{s['search_steps']:.0f} | {s['search_seconds']:.0f} | {s['train_seconds']:.0f} |"
        )
    notes = [f"{s['strategy']}: {s['note']}" for s in summary if s["note"]]
    if notes:
        lines += ["", "Notes: " + " | ".join(notes)]
    return "\n".join(lines)


def plot_comparison(summary: Sequence[dict[str, Any]], metric: str, path: Path, title: str | None = None) -> None:
    """Test score (mean +- std over runs) per strategy, trainable parameters on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s["strategy"] for s in summary]
    means = [100 * s["test"] for s in summary]
    stds = [100 * s["test_std"] for s in summary]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 3.6), constrained_layout=True)
    colors = ["tab:red" if n == "spt" else "tab:blue" for n in names]
    bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
    for bar, s in zip(bars, summary):
        ax.annotate(f"{s['trainable_params'] / 1000:.0f}k", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(f"test {metric} (%)")
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 8))
    ax.set_title(title or "Strategies (mean ± std over runs; labels: trainable params)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=150)
    plt.close(fig)
