"""Regenerate the README's figures in docs/figures/ from run directories.

The figures need real searches, which this repository does not ship. The README's figures
come from the quality benchmark's searches with the current defaults (run
`python benchmarks/quality.py run` first; any `spt search` run directories work too):

    W=benchmarks/results/quality/work
    python docs/figures/make_gallery.py \
        --heatmap $W/sst2-16shot/honest/seed* $W/agnews-8shot/honest/seed* $W/cb-8shot/honest/seed* \
        --trajectory $W/sst2-16shot/honest/seed13 $W/agnews-8shot/honest/seed21

Run directories of the same task (their config's task name) are averaged into one column.

Optional: `--compare runs/cmp-sst2` (an `spt compare` output directory) adds
docs/figures/<dir name>-compare.png; `--out-dir DIR` writes elsewhere; `--format pdf`
writes PDFs (TrueType fonts embedded) instead of PNGs; `--size W H`, `--font-size PT`
and `--dpi N` as for `spt plot`. Existing figures are overwritten; each gets its
Markdown twin with the same numbers beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from analysis import FigureStyle, plot, plot_comparison  # noqa: E402
from search.comparison import aggregate, markdown_table, read_rows_csv  # noqa: E402
from spt.errors import UserError  # noqa: E402

HEATMAP = ("minilm-heatmap-tasks", "MiniLM-L6: gates as ranked, per task (box: selected, K=3)")
TRAJECTORIES = ("minilm-trajectories", "MiniLM-L6: gate trajectories during the search (bold: selected)")


def _compare(run_dir: Path, out: Path, style: FigureStyle) -> Path:
    """compare.csv of an ``spt compare`` run -> the points-with-error-bars figure and its table."""
    import yaml

    csv_path = run_dir / "compare.csv"
    if not csv_path.is_file():
        raise UserError(f"--compare: {run_dir} has no compare.csv; is it an spt compare directory?")
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    metric = ((config or {}).get("task") or {}).get("metric", "score")
    summary = aggregate(read_rows_csv(csv_path))
    title = f"{run_dir.name}: strategies, mean ± std over seeds"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_comparison(summary, metric, out, title, style=style)
    out.with_suffix(".md").write_text(f"# {title}\n\n![comparison]({out.name})\n\n{markdown_table(summary, metric)}\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heatmap", nargs="+", metavar="RUN", help="search/run directories, one per task")
    parser.add_argument("--trajectory", nargs="+", metavar="RUN", help="search/run directories to draw trajectories of")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="spt compare output directories")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent), help="default: docs/figures")
    parser.add_argument("--format", choices=["png", "pdf", "svg"], default="png")
    parser.add_argument("--size", nargs=2, type=float, metavar=("W", "H"))
    parser.add_argument("--font-size", type=float)
    parser.add_argument("--dpi", type=float, default=150.0)
    args = parser.parse_args(argv)
    if not (args.heatmap or args.trajectory or args.compare):
        parser.error("give at least one of --heatmap, --trajectory, --compare")
    out_dir = Path(args.out_dir)
    options = {"size": args.size, "font_size": args.font_size, "dpi": args.dpi, "force": True}
    written = []
    try:
        if args.heatmap:
            name, title = HEATMAP
            out = out_dir / f"{name}.{args.format}"
            plot(args.heatmap, out, kind="heatmap", by="task", title=title, **options)
            written.append(out)
        if args.trajectory:
            name, title = TRAJECTORIES
            out = out_dir / f"{name}.{args.format}"
            plot(args.trajectory, out, kind="trajectory", title=title, **options)
            written.append(out)
        style = FigureStyle(size=tuple(args.size) if args.size else None, font_size=args.font_size, dpi=args.dpi)
        for run_dir in args.compare or []:
            written.append(_compare(Path(run_dir), out_dir / f"{Path(run_dir).name}-compare.{args.format}", style))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
