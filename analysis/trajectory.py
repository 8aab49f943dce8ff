"""Gate trajectories: each layer's gate over the search steps, the final top-K highlighted."""

from __future__ import annotations

import math

from .runs import RunGates


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


def render_trajectories(runs: list[RunGates], path: str, title: str | None = None) -> None:
    """One panel per run: gate per layer over steps; selected layers drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for k, run in enumerate(runs):
        ax = axes[k // cols][k % cols]
        L = max(run.num_layers, 2)
        for j, layer in enumerate(run.candidate_layers):
            chosen = layer in run.selected_layers
            series = [h[j] for h in run.history]
            ax.plot(run.steps, series, color=cmap(layer / (L - 1)), linewidth=2.4 if chosen else 1.0,
                    alpha=1.0 if chosen else 0.45, label=f"layer {layer}{' (selected)' if chosen else ''}")
            if chosen:
                ax.annotate(str(layer), (run.steps[-1], series[-1]), xytext=(3, 0), textcoords="offset points",
                            fontsize=8, va="center")
        ax.set_title(f"{run.task} · {run.backbone} · seed {run.seed}", fontsize=9)
        ax.set_xlabel("search step")
        ax.set_ylabel("gate α")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if len(run.candidate_layers) <= 12:
            ax.legend(fontsize=6, ncol=2, loc="best")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)
