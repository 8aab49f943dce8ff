"""analysis: layer-importance heatmaps, gate trajectories and comparison reports.

Every picture comes with a Markdown file holding the same numbers, so it can be checked
without opening the image. Every plotting function returns its matplotlib ``Figure``
(restyle it in a notebook, then write it again with :func:`save_figure`). Figures are
drawn on matplotlib's Agg canvas without pyplot: no display needed, no window ever
opened, and a notebook's own backend is left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from spt.errors import UserError
from spt.files import check_writable, write_text_atomic

from .comparison import plot_comparison
from .heatmap import HeatmapData, heatmap_data, render_heatmap
from .runs import RunGates, load_run
from .style import FigureStyle, save_figure
from .trajectory import render_trajectories, trajectory_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".pdf")

__all__ = [
    "FigureStyle", "HeatmapData", "RunGates", "heatmap_data", "load_run", "plot", "plot_comparison", "render_heatmap",
    "render_trajectories", "save_figure", "trajectory_markdown",
]


def plot(
    run_dirs: list[str | Path], out: str | Path, kind: str = "heatmap", by: str = "task", value: str = "gate",
    align: str = "refuse", title: str | None = None, force: bool = False, vmax: float | str = 1.0,
    size: tuple[float, float] | None = None, font_size: float | None = None, dpi: float = 150.0,
) -> Figure:
    """Draw a heatmap or trajectory figure of ``run_dirs`` to ``out`` and its numbers to ``out`` with ``.md``.

    ``vmax`` (heatmaps): top of the colour scale, 1 by default so that colours compare
    across figures; ``"auto"``: this figure's largest value. ``size`` (inches), ``font_size``
    (points) and ``dpi`` style the figure. Returns the figure; the files written are
    ``out`` and ``Path(out).with_suffix(".md")``.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out: {out} must end in .png, .svg or .pdf")
    summary = out.with_suffix(".md")
    for path in (out, summary):
        if path.exists() and not force:
            raise UserError(f"--out: {path} already exists; pass --force to overwrite it")
    if kind not in ("heatmap", "trajectory"):
        raise UserError(f"--kind: must be heatmap or trajectory, got {kind!r}")
    check_writable(out, "--out")
    style = FigureStyle(size=tuple(size) if size is not None else None, font_size=font_size, dpi=dpi)
    runs = [load_run(p) for p in run_dirs]
    if kind == "heatmap":
        data = heatmap_data(runs, by=by, value=value, align=align)
        figure = render_heatmap(data, None, title, vmax=vmax, style=style)
        text = data.to_markdown()
    else:
        figure = render_trajectories(runs, None, title, style=style)
        text = trajectory_markdown(runs)
    out.parent.mkdir(parents=True, exist_ok=True)  # only once everything is checked and drawn
    save_figure(figure, out, style)
    write_text_atomic(summary, f"# {title or kind}\n\n![{kind}]({out.name})\n\n{text}\n")
    return figure
