"""Layer-importance heatmaps: layers x tasks (or seeds, backbones, runs).

A column gathers the runs that share the chosen attribute. Its cells hold the mean final
gate of each layer over those runs (``value="gate"``) or the share of those runs that
selected the layer (``value="frequency"``). A cell is *marked* when more than half of the
column's runs selected that layer.

Runs whose backbones have different layer counts are refused, unless ``align="depth"``:
then rows are relative-depth bins (as many as the deepest backbone has layers) and a
layer ``i`` of an ``L``-layer backbone fills the bins covering depths ``[i/L, (i+1)/L)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spt.errors import UserError

from .runs import RunGates

BY = ("task", "seed", "backbone", "run")
VALUES = ("gate", "frequency")


@dataclass
class HeatmapData:
    """What the figure shows: ``matrix[row][col]``, rows from layer 0 (the embeddings) up."""

    row_labels: list[str]
    column_labels: list[str]
    matrix: list[list[float]]
    marked: list[list[bool]]
    value: str
    runs_per_column: list[int]

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
        what = "final gate alpha (mean over runs)" if self.value == "gate" else "selection frequency over runs"
        runs = ", ".join(f"{label}: {n}" for label, n in zip(self.column_labels, self.runs_per_column))
        lines += ["", f"Values: {what}. `*`: selected by more than half of the column's runs. Runs per column: {runs}."]
        return "\n".join(lines)


def _row_values(run: RunGates, rows: int, align: str, value: str) -> tuple[list[float], list[bool]]:
    """The run's per-row value and selection, on ``rows`` rows."""
    per_layer = {layer: (gate if value == "gate" else float(layer in run.selected_layers))
                 for layer, gate in zip(run.candidate_layers, run.final)}
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
    for c, label in enumerate(labels):
        group = columns[label]
        per_run = [_row_values(run, rows, align, value) for run in group]
        for r in range(rows):
            vals = [v[r] for v, _ in per_run if not math.isnan(v[r])]
            matrix[r][c] = sum(vals) / len(vals) if vals else float("nan")
            marked[r][c] = sum(ch[r] for _, ch in per_run) * 2 > len(group)
    if align == "depth" and len(depths) > 1:
        row_labels = [f"{r / rows:.2f}" for r in range(rows)]
    else:
        row_labels = ["0 (emb)"] + [str(r) for r in range(1, rows)]
    return HeatmapData(row_labels, labels, matrix, marked, value, [len(columns[label]) for label in labels])


def render_heatmap(data: HeatmapData, path: str, title: str | None = None) -> None:
    """Draw ``data`` to ``path`` (PNG, SVG or PDF by extension); never opens a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    matrix = np.array(data.matrix, dtype=float)
    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * cols, 1.2 + 0.45 * rows), constrained_layout=True)
    vmax = 1.0 if data.value == "frequency" else max(0.5, float(np.nanmax(matrix)))
    image = ax.imshow(matrix, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    for r in range(rows):
        for c in range(cols):
            v = matrix[r, c]
            if np.isnan(v):
                continue
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if v > 0.6 * vmax else "white", fontweight="bold" if data.marked[r][c] else "normal")
            if data.marked[r][c]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(cols), data.column_labels, rotation=30 if cols > 4 else 0, ha="right" if cols > 4 else "center")
    ax.set_yticks(range(rows), data.row_labels)
    ax.set_ylabel("relative depth" if data.row_labels[0] == "0.00" else "candidate layer")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("final gate α" if data.value == "gate" else "selection frequency")
    ax.set_title(title or "Layer importance (red box: selected)", fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)
