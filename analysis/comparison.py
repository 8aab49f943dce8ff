"""Comparison pictures: per-strategy scores as points with error bars, and score-against-size
fronts. The tables they show (``compare.csv``, mean +- std) are :mod:`search.comparison`'s."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .style import PALETTE, FigureStyle, new_figure, save_figure, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from search.comparison import Chart


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


def draw_chart(chart: Chart, style: FigureStyle | None = None) -> Figure:
    """Draw what a command described (:class:`search.comparison.Chart`) and write it to its path."""
    if chart.kind == "comparison":
        return plot_comparison(chart.data, chart.metric, chart.path, chart.title, style)
    if chart.kind == "fronts":
        return plot_fronts(chart.data, chart.metric, chart.path, chart.title, style)
    raise ValueError(f"unknown chart kind {chart.kind!r}")
