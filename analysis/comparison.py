"""Comparison reports: per-strategy mean +- std over seeds (Markdown, CSV) and a plot of points with error bars."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spt.errors import UserError
from spt.files import read_text, write_text_atomic

from .style import PALETTE, FigureStyle, new_figure, save_figure, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLUMNS = [
    "strategy", "seed", "draw", "layers", "dev", "test", "trainable_params",
    "search_steps", "search_seconds", "train_steps", "train_seconds", "note",
]


def write_rows_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the result rows (atomically: a kill leaves the previous rows or the new ones)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def read_rows_csv(path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text(path, str(path)), newline=""))
    try:
        return list(reader)
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}", f"is damaged ({exc}); delete it to compare from scratch") from None


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


def plot_comparison(
    summary: Sequence[dict[str, Any]], metric: str, path: Path | str | None = None, title: str | None = None,
    style: FigureStyle | None = None,
) -> Figure:
    """Dev and test score per strategy as points with error bars (mean +- std over runs).

    Points, not bars: the y-axis can then zoom on the scores without bars that start
    above 0. Tick labels carry each strategy's trainable parameters; ``spt`` is bold.
    Writes the figure to ``path`` when given and returns it.
    """
    style = style or FigureStyle()
    names = [s["strategy"] for s in summary]
    x = list(range(len(names)))
    with styled(style):
        fig = new_figure(style, (1.6 + 0.9 * len(names), 4.0))
        ax = fig.add_subplot()
        series = (("dev", "o", PALETTE[4], -0.12), ("test", "s", PALETTE[5], 0.12))
        for split, marker, color, shift in series:
            means = [100 * float(s[split]) for s in summary]
            stds = [100 * float(s[f"{split}_std"]) for s in summary]
            ax.errorbar([i + shift for i in x], means, yerr=stds, fmt=marker, color=color, ecolor=color,
                        capsize=3, markersize=5, linestyle="none", label=f"{split} (mean ± std)")
        labels = [f"{name}\n{s['trainable_params'] / 1000:,.0f}k params" for name, s in zip(names, summary)]
        ax.set_xticks(x, labels, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center",
                      fontsize="small")
        for tick, name in zip(ax.get_xticklabels(), names):
            if name == "spt":
                tick.set_fontweight("bold")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        runs = sorted({int(s["runs"]) for s in summary if "runs" in s})
        per = f"{runs[0]} runs" if len(runs) == 1 else "runs"
        ax.set_title(title or f"Strategies: dev and test {metric}, mean ± std over {per}", fontsize="medium")
        if path is not None:
            save_figure(fig, path, style)
    return fig


def plot_fronts(fronts: dict[str, Sequence[dict[str, Any]]], metric: str, path: Path | str | None = None,
                title: str | None = None, style: FigureStyle | None = None) -> Figure:
    """Test score against trainable parameters: one line of points per strategy (``fronts``:
    name -> rows with ``trainable_params``, ``test`` and optionally ``k``), each point labelled
    by its K. Writes the figure to ``path`` when given and returns it."""
    style = style or FigureStyle()
    with styled(style):
        fig = new_figure(style, (6.0, 4.0))
        ax = fig.add_subplot()
        for i, (name, rows) in enumerate(fronts.items()):
            rows = sorted(rows, key=lambda r: float(r["trainable_params"]))
            xs = [float(r["trainable_params"]) / 1000 for r in rows]
            ys = [100 * float(r["test"]) for r in rows]
            ax.plot(xs, ys, marker="os^vD<>"[i % 7], color=PALETTE[(i + 4) % len(PALETTE)], label=name)
            for x, y, r in zip(xs, ys, rows):
                if r.get("k") not in (None, ""):
                    ax.annotate(f"K={r['k']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        ax.set_xlabel("trainable parameters (thousands)")
        ax.set_ylabel(f"test {metric} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", frameon=False)
        ax.set_title(title or f"Test {metric} against size", fontsize="medium")
        if path is not None:
            save_figure(fig, path, style)
    return fig
