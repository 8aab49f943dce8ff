"""Layer-importance heatmaps: layers x tasks (or seeds, backbones, runs).

A column gathers the runs that share the chosen attribute. Its cells hold the mean over
those runs of each layer's gate as selection ranks it (``value="gate"``: averaged over the
steps ``select.average_last`` names, by default the last epoch's, so in a run selected by
gates a box never sits on a lower value than an unboxed cell of the same run) or the share of those runs that
selected the layer (``value="frequency"``). A cell is *marked* when more than half of the
column's runs selected that layer.

Runs whose backbones have different layer counts are refused, unless ``align="depth"``:
then rows are relative-depth bins (as many as the deepest backbone has layers) and a
layer ``i`` of an ``L``-layer backbone fills the bins covering depths ``[i/L, (i+1)/L)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spt.errors import UserError

from .runs import RunGates, shared_description
from .style import FigureStyle, new_figure, save_figure, styled, text_color

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BY = ("task", "seed", "backbone", "run")
VALUES = ("gate", "frequency")
COLORBAR_LABELS = {"gate": "gate α as ranked (mean over runs)", "frequency": "selection frequency (share of runs)"}


@dataclass
class HeatmapData:
    """What the figure shows: ``matrix[row][col]``, rows from layer 0 (the embeddings) up.

    ``cell_ids[row][col]``: rows of a column that share an id belong to one layer of that
    column's backbone (under ``align="depth"`` a layer of a shallower backbone spans
    several rows); they are drawn as one cell with one value and at most one box.
    ``by``: the attribute the columns group runs by; ``context``: what all runs share
    (task, backbone, K, seed), for the title.
    """

    row_labels: list[str]
    column_labels: list[str]
    matrix: list[list[float]]
    marked: list[list[bool]]
    value: str
    runs_per_column: list[int]
    cell_ids: list[list[int]] = field(default_factory=list)
    by: str = ""
    context: str = ""
    averaged: str = ""  # which steps each run's gates average, in words

    def cells(self, column: int) -> list[tuple[int, int]]:
        """The column's cells as ``(first_row, stop_row)`` spans, bottom up."""
        ids = [row[column] for row in self.cell_ids] if self.cell_ids else list(range(len(self.row_labels)))
        spans: list[tuple[int, int]] = []
        for r, cell in enumerate(ids):
            if spans and ids[spans[-1][0]] == cell:
                spans[-1] = (spans[-1][0], r + 1)
            else:
                spans.append((r, r + 1))
        return spans

    def to_markdown(self) -> str:
        """The same numbers as a Markdown table (marked cells carry a ``*``)."""
        header = f"| {'layer':<8} | " + " | ".join(self.column_labels) + " |"
        lines = [header, "|" + "---|" * (len(self.column_labels) + 1)]
        for r in reversed(range(len(self.row_labels))):  # top layer first, as in the figure
            cells = []
            for c in range(len(self.column_labels)):
                v = self.matrix[r][c]
                cells.append("-" if math.isnan(v) else f"{v:.3f}{'*' if self.marked[r][c] else ''}")
            lines.append(f"| {self.row_labels[r]:<8} | " + " | ".join(cells) + " |")
        what = (f"gate alpha as selection ranks it ({self.averaged}), mean over runs" if self.value == "gate"
                else "selection frequency over runs")
        runs = ", ".join(f"{label}: {n}" for label, n in zip(self.column_labels, self.runs_per_column))
        lines += ["", f"Values: {what}. `*`: selected by more than half of the column's runs. Runs per column: {runs}."]
        return "\n".join(lines)


def _row_values(run: RunGates, rows: int, align: str, value: str) -> tuple[list[float], list[bool]]:
    """The run's per-row value and selection, on ``rows`` rows."""
    per_layer = {layer: (gate if value == "gate" else float(layer in run.selected_layers))
                 for layer, gate in zip(run.candidate_layers, run.ranked)}
    selected = set(run.selected_layers)
    values, chosen = [], []
    for r in range(rows):
        if align == "depth":
            layer = math.floor((r + 0.5) / rows * run.num_layers)
        else:
            layer = r
        values.append(per_layer.get(layer, float("nan") if value == "gate" else 0.0))
        chosen.append(layer in selected)
    return values, chosen


def heatmap_data(runs: list[RunGates], by: str = "task", value: str = "gate", align: str = "refuse") -> HeatmapData:
    """Group ``runs`` into columns by ``by`` and build the matrix."""
    if not runs:
        raise UserError("plot: no runs given")
    if by not in BY:
        raise UserError(f"--by: must be one of {', '.join(BY)}, got {by!r}")
    if value not in VALUES:
        raise UserError(f"--value: must be gate or frequency, got {value!r}")
    if align not in ("refuse", "depth"):
        raise UserError(f"--align: must be refuse or depth, got {align!r}")
    depths = sorted({run.num_layers for run in runs})
    if len(depths) > 1 and align != "depth":
        names = ", ".join(f"{run.path.name} ({run.num_layers})" for run in runs)
        raise UserError(
            f"plot: the runs have different layer counts ({names}); pass --align depth to align them by relative depth"
        )
    rows = depths[-1]
    columns: dict[str, list[RunGates]] = {}
    for run in runs:
        columns.setdefault(run.attribute(by), []).append(run)
    labels = list(columns)
    matrix = [[0.0] * len(labels) for _ in range(rows)]
    marked = [[False] * len(labels) for _ in range(rows)]
    cell_ids = [[r] * len(labels) for r in range(rows)]
    for c, label in enumerate(labels):
        group = columns[label]
        column_depths = {run.num_layers for run in group}
        if len(column_depths) == 1:  # one backbone depth: a cell is one of its layers
            depth = column_depths.pop()
            for r in range(rows):
                cell_ids[r][c] = math.floor((r + 0.5) / rows * depth)
        per_run = [_row_values(run, rows, align, value) for run in group]
        for r in range(rows):
            vals = [v[r] for v, _ in per_run if not math.isnan(v[r])]
            matrix[r][c] = sum(vals) / len(vals) if vals else float("nan")
            marked[r][c] = sum(ch[r] for _, ch in per_run) * 2 > len(group)
    if align == "depth" and len(depths) > 1:
        row_labels = [f"{r / rows:.2f}" for r in range(rows)]
    else:
        row_labels = ["0 (emb)"] + [str(r) for r in range(1, rows)]
    return HeatmapData(row_labels, labels, matrix, marked, value, [len(columns[label]) for label in labels],
                       cell_ids=cell_ids, by=by, context=shared_description(runs, skip=(by,)),
                       averaged="; ".join(sorted({run.averaged for run in runs})))


def _vmax(data: HeatmapData, vmax: float | str) -> float:
    """The top of the colour scale: a number, or ``"auto"`` (this figure's largest value)."""
    if isinstance(vmax, str):
        if vmax.strip().lower() == "auto":
            finite = [v for row in data.matrix for v in row if not math.isnan(v)]
            top = max(finite, default=0.0)
            return top if top > 0 else 1.0
        try:
            vmax = float(vmax)
        except ValueError:
            raise UserError(f"--vmax: give a number in (0, 1] or auto, got {vmax!r}") from None
    if not 0 < vmax <= 1 or math.isnan(vmax):
        raise UserError(f"--vmax: give a number in (0, 1] or auto, got {vmax!r}")
    return float(vmax)


def default_title(data: HeatmapData) -> str:
    """``Gate α by task: minilm-l6 · K=3 · seed 42`` - what the figure shows and of what."""
    what = "Gate α" if data.value == "gate" else "Selection frequency"
    head = f"{what} by {data.by}" if data.by else what
    return f"{head}: {data.context}" if data.context else head


def render_heatmap(
    data: HeatmapData, path: str | Path | None = None, title: str | None = None, vmax: float | str = 1.0,
    style: FigureStyle | None = None,
) -> Figure:
    """Draw ``data``; write it to ``path`` (PNG, SVG or PDF by extension) when given; return the figure.

    Colours run over a fixed 0-1 scale, so one colour means one gate value (or selection
    frequency) in every figure; ``vmax="auto"`` stretches them to this figure's largest
    value instead. A box marks a cell selected by more than half of the column's runs
    (one box per cell, however many depth rows the cell spans); ``n = ...`` under each
    column label counts its runs. Never opens a window.
    """
    import numpy as np
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    style = style or FigureStyle()
    matrix = np.array(data.matrix, dtype=float)
    rows, cols = matrix.shape
    top = _vmax(data, vmax)
    with styled(style):
        fig = new_figure(style, (2.2 + 1.1 * cols, 1.6 + 0.45 * rows))
        ax = fig.add_subplot()
        image = ax.imshow(matrix, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=top,
                          interpolation="nearest")
        outline = [patheffects.Stroke(linewidth=4.0, foreground="black"), patheffects.Normal()]
        for c in range(cols):
            for start, stop in data.cells(c):
                v = matrix[start, c]
                if np.isnan(v):
                    continue
                centre = (start + stop - 1) / 2
                ax.text(c, centre, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color=text_color(image.to_rgba(v)), fontweight="bold" if data.marked[start][c] else "normal")
                if data.marked[start][c]:
                    box = Rectangle((c - 0.5, start - 0.5), 1, stop - start, fill=False, edgecolor="white",
                                    linewidth=2.0, path_effects=outline)
                    ax.add_patch(box)
        labels = [f"{label}\nn = {n}" for label, n in zip(data.column_labels, data.runs_per_column)]
        tilt = cols > 4
        ax.set_xticks(range(cols), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        ax.set_yticks(range(rows), data.row_labels)
        ax.set_ylabel("relative depth" if data.row_labels[0] == "0.00" else "candidate layer")
        bar = fig.colorbar(image, ax=ax)
        auto = isinstance(vmax, str) and vmax.strip().lower() == "auto"
        bar.set_label(COLORBAR_LABELS[data.value] + (" (scale: this figure's maximum)" if auto else ""))
        ax.set_title(title or default_title(data), fontsize="medium")
        ax.set_xlabel(f"{data.by or 'column'} (box: selected by more than half of the column's runs)",
                      fontsize="small")
        if path is not None:
            save_figure(fig, path, style)
    return fig
