"""analysis: layer-importance heatmaps, gate trajectories and comparison reports.

Every picture comes with a Markdown file holding the same numbers, so it can be checked
without opening the image. Rendering uses matplotlib's Agg backend: no display needed,
no window ever opened.
"""

from __future__ import annotations

from pathlib import Path

from spt.errors import UserError

from .heatmap import HeatmapData, heatmap_data, render_heatmap
from .runs import RunGates, load_run
from .trajectory import render_trajectories, trajectory_markdown

FORMATS = (".png", ".svg", ".pdf")

__all__ = ["HeatmapData", "RunGates", "heatmap_data", "load_run", "plot", "render_heatmap", "render_trajectories", "trajectory_markdown"]


def plot(
    run_dirs: list[str | Path], out: str | Path, kind: str = "heatmap", by: str = "task", value: str = "gate",
    align: str = "refuse", title: str | None = None, force: bool = False,
) -> tuple[Path, Path]:
    """Draw a heatmap or trajectory figure of ``run_dirs`` to ``out`` and its numbers to ``out``.md."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out: {out} must end in .png, .svg or .pdf")
    summary = out.with_suffix(".md")
    for path in (out, summary):
        if path.exists() and not force:
            raise UserError(f"--out: {path} already exists; pass --force to overwrite it")
    if kind not in ("heatmap", "trajectory"):
        raise UserError(f"--kind: must be heatmap or trajectory, got {kind!r}")
    runs = [load_run(p) for p in run_dirs]
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "heatmap":
        data = heatmap_data(runs, by=by, value=value, align=align)
        render_heatmap(data, str(out), title)
        text = data.to_markdown()
    else:
        render_trajectories(runs, str(out), title)
        text = trajectory_markdown(runs)
    summary.write_text(f"# {title or kind}\n\n![{kind}]({out.name})\n\n{text}\n")
    return out, summary
