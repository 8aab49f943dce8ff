"""Gate trajectories: each layer's gate over the search steps, the final top-K highlighted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .runs import RunGates, distinct_descriptions, shared_description
from .style import LINESTYLES, PALETTE, FigureStyle, new_figure, save_figure, styled

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def trajectory_markdown(runs: list[RunGates], points: int = 5) -> str:
    """Gate values at a few evenly spaced logged steps, one table per run."""
    blocks = []
    for run in runs:
        n = len(run.steps)
        picks = sorted({round(i * (n - 1) / max(1, points - 1)) for i in range(points)})
        header = "| layer | " + " | ".join(f"step {run.steps[p]}" for p in picks) + " |"
        lines = [f"**{run.path.name}** ({run.task}, {run.backbone}, seed {run.seed}; selected {run.selected_layers})", "",
                 header, "|" + "---|" * (len(picks) + 1)]
        for j, layer in enumerate(run.candidate_layers):
            mark = "*" if layer in run.selected_layers else ""
            lines.append(f"| {layer}{mark} | " + " | ".join(f"{run.history[p][j]:.3f}" for p in picks) + " |")
        blocks.append("\n".join(lines))
    blocks.append("`*`: selected layer.")
    return "\n\n".join(blocks)


def layer_style(position: int) -> tuple[str, str]:
    """Colour and line style of the ``position``-th candidate layer: colour-blind-safe
    colours, none pale, and no two of the first 28 layers alike."""
    return PALETTE[position % len(PALETTE)], LINESTYLES[position % len(LINESTYLES)]


def spread(targets: list[float], gap: float, low: float, high: float) -> list[float]:
    """Positions near ``targets`` (same order), at least ``gap`` apart, within [low, high] if they fit."""
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    ys = [min(max(targets[i], low), high) for i in order]
    for j in range(1, len(ys)):
        ys[j] = max(ys[j], ys[j - 1] + gap)
    if ys and ys[-1] > high:
        ys[-1] = high
        for j in range(len(ys) - 2, -1, -1):
            ys[j] = min(ys[j], ys[j + 1] - gap)
    out = [0.0] * len(targets)
    for j, i in enumerate(order):
        out[i] = ys[j]
    return out


def render_trajectories(
    runs: list[RunGates], path: str | Path | None = None, title: str | None = None, style: FigureStyle | None = None,
) -> Figure:
    """One panel per run: each layer's gate over the search steps; write to ``path`` when given; return the figure.

    Layers keep one colour and line style in every panel (shared legend below the panels);
    selected layers are drawn bold and labelled at their final value, labels spaced so
    they never overlap. Each panel's title names what sets its run apart (task, backbone,
    K, seed, else the directory); the figure title names what the runs share.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    style = style or FigureStyle()
    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    layers = sorted({layer for run in runs for layer in run.candidate_layers})
    position = {layer: j for j, layer in enumerate(layers)}
    with styled(style):
        fig = new_figure(style, (4.8 * cols, 3.2 * rows + 0.4 + 0.25 * math.ceil(len(layers) / 8)))
        axes = fig.subplots(rows, cols, squeeze=False)
        names = distinct_descriptions(runs)
        for k, run in enumerate(runs):
            ax = axes[k // cols][k % cols]
            for j, layer in enumerate(run.candidate_layers):
                color, dashes = layer_style(position[layer])
                chosen = layer in run.selected_layers
                ax.plot(run.steps, [h[j] for h in run.history], color=color, linestyle=dashes,
                        linewidth=2.4 if chosen else 1.1, zorder=3 if chosen else 2)
            ax.set_title(f"{names[k]}\nselected: {', '.join(map(str, run.selected_layers))}", fontsize="medium")
            ax.set_xlabel("search step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5 on a short run
            ax.set_ylabel("gate α")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].axis("off")
        handles = [Line2D([], [], color=layer_style(position[layer])[0], linestyle=layer_style(position[layer])[1],
                          linewidth=1.6) for layer in layers]
        fig.legend(handles, [f"layer {layer}" for layer in layers], loc="outside lower center",
                   ncol=min(len(layers), 8), fontsize="small", title="bold: selected", title_fontsize="small")
        shared = shared_description(runs)
        fig.suptitle(title or ("Gate trajectories" + (f": {shared}" if shared else "")), fontsize="large")
        fig.draw_without_rendering()  # lay out once, so label spacing can be measured in pixels
        for k, run in enumerate(runs):
            _label_selected(axes[k // cols][k % cols], run, position, fig.dpi)
        if path is not None:
            save_figure(fig, path, style)
    return fig


def _label_selected(ax, run: RunGates, position: dict[int, int], dpi: float) -> None:
    """Label each selected layer at its final gate, the labels spread so they never overlap."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.transforms import blended_transform_factory

    label_px = 1.3 * FontProperties(size="small").get_size_in_points() * dpi / 72
    picked = [(layer, run.final[j]) for j, layer in enumerate(run.candidate_layers)
              if layer in run.selected_layers and not math.isnan(run.final[j])]
    gap = label_px / max(ax.get_window_extent().height, 1.0)  # the y range is 1
    ys = spread([y for _, y in picked], gap, 0.0, 1.0)
    where = blended_transform_factory(ax.transAxes, ax.transData)
    for (layer, y_end), y_text in zip(picked, ys):
        color = layer_style(position[layer])[0]
        ax.annotate(str(layer), xy=(run.steps[-1], y_end), xytext=(1.03, y_text), textcoords=where,
                    fontsize="small", color=color, fontweight="bold", va="center", ha="left", annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6, "shrinkA": 0, "shrinkB": 0})
