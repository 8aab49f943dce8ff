"""Heatmaps and trajectories: the data behind the figures, the files, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.image
import pytest
import yaml
from helpers import tiny_config
from matplotlib.figure import Figure
from matplotlib.text import Text

from analysis import (
    heatmap_data,
    load_run,
    plot,
    plot_comparison,
    render_heatmap,
    render_trajectories,
    save_figure,
    trajectory_markdown,
)
from search.cli import main
from spt.errors import UserError


def fake_run(root: Path, name: str, task: str, seed: int, finals: list[float], k: int = 2, backbone: str = "minilm-l6") -> Path:
    """A run directory with a two-step gate history ending at ``finals`` and its top-k mask."""
    path = root / name
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "task": {"name": task}, "model": {"backbone": backbone}, "select": {"k": k}}))
    lines = ["step,epoch,layer,alpha"]
    for step, values in ((0, [0.5] * len(finals)), (10, finals)):
        lines += [f"{step},0,{layer},{v}" for layer, v in enumerate(values)]
    (path / "gates.csv").write_text("\n".join(lines) + "\n")
    selected = sorted(sorted(range(len(finals)), key=lambda i: (-finals[i], i))[:k])
    mask = {"format": "spt-layer-mask", "version": 1, "backbone": backbone, "num_layers": len(finals),
            "candidate_layers": list(range(len(finals))), "selected_layers": selected,
            "mask": [int(i in selected) for i in range(len(finals))], "scores": finals, "k": k, "param_budget": None,
            "trainable_params": 1, "prompt_length": 10, "task": task, "seed": seed}
    (path / "layer_mask.json").write_text(json.dumps(mask))
    return path


def test_heatmap_matrix_by_task_averages_seeds_and_marks_majority_selections(tmp_path):
    runs = [
        load_run(fake_run(tmp_path, "a1", "sst2", 1, [0.9, 0.1, 0.8, 0.2])),
        load_run(fake_run(tmp_path, "a2", "sst2", 2, [0.7, 0.3, 0.2, 0.6])),
        load_run(fake_run(tmp_path, "b1", "rte", 1, [0.1, 0.9, 0.2, 0.7])),
    ]
    data = heatmap_data(runs, by="task", value="gate")
    assert data.column_labels == ["sst2", "rte"] and data.row_labels == ["0 (emb)", "1", "2", "3"]
    assert [row[0] for row in data.matrix] == pytest.approx([0.8, 0.2, 0.5, 0.4])
    assert [row[1] for row in data.matrix] == pytest.approx([0.1, 0.9, 0.2, 0.7])
    # sst2: layer 0 chosen by both runs; layers 2 and 3 by one of two each (not a majority)
    assert [row[0] for row in data.marked] == [True, False, False, False]
    assert [row[1] for row in data.marked] == [False, True, False, True]
    freq = heatmap_data(runs, by="task", value="frequency")
    assert [row[0] for row in freq.matrix] == pytest.approx([1.0, 0.0, 0.5, 0.5])
    by_seed = heatmap_data(runs, by="seed")
    assert by_seed.column_labels == ["1", "2"] and by_seed.runs_per_column == [2, 1]
    table = data.to_markdown()
    assert "| 0 (emb)  | 0.800* | 0.100 |" in table and table.index("| 3 ") < table.index("| 0 (emb)")


def test_heatmap_cells_hold_the_gates_selection_ranked_not_the_last_step(tmp_path):
    """The last epoch logged two steps; selection ranks their mean (select.average_last 0), under
    which layer 1 (0.60, 0.40: mean 0.50) beats layer 0 (0.30, 0.55: mean 0.425) although layer
    0's last gate is higher. The cells show the means, so the boxed cell is the higher one."""
    path = tmp_path / "run"
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"seed": 1, "task": {"name": "t"}, "model": {"backbone": "b"},
                                                      "select": {"k": 1, "average_last": 0}}))
    rows = [(0, 0, (0.5, 0.5)), (1, 1, (0.30, 0.60)), (2, 1, (0.55, 0.40))]  # a short run: steps 0-2
    (path / "gates.csv").write_text("step,epoch,layer,alpha\n" + "".join(
        f"{step},{epoch},{layer},{a}\n" for step, epoch, values in rows for layer, a in enumerate(values)))
    run = load_run(path)  # no layer_mask.json yet: selected as selection would
    assert run.ranked == pytest.approx([0.425, 0.5]) and run.selected_layers == [1] and run.final == [0.55, 0.40]
    data = heatmap_data([run])
    assert [row[0] for row in data.matrix] == pytest.approx([0.425, 0.5]) and [row[0] for row in data.marked] == [False, True]
    assert "gate alpha as selection ranks it (mean over the last epoch's logged steps)" in data.to_markdown()
    fig = render_trajectories([run])
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


def test_different_layer_counts_are_refused_or_aligned_by_depth(tmp_path):
    small = load_run(fake_run(tmp_path, "s", "sst2", 1, [0.9, 0.1, 0.5], k=1))
    large = load_run(fake_run(tmp_path, "l", "sst2", 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.95], k=1, backbone="mpnet-base"))
    with pytest.raises(UserError, match=r"different layer counts \(s \(3\), l \(6\)\); pass --align depth"):
        heatmap_data([small, large], by="backbone")
    data = heatmap_data([small, large], by="backbone", align="depth")
    assert data.row_labels == ["0.00", "0.17", "0.33", "0.50", "0.67", "0.83"]
    assert [row[0] for row in data.matrix] == pytest.approx([0.9, 0.9, 0.1, 0.1, 0.5, 0.5])  # 3 layers over 6 bins
    assert [row[1] for row in data.matrix] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.95])
    assert [row[0] for row in data.marked] == [True, True, False, False, False, False]


def test_trajectory_table_and_missing_history(tmp_path):
    run = load_run(fake_run(tmp_path, "a", "sst2", 1, [0.9, 0.1, 0.8, 0.2]))
    assert run.steps == [0, 10] and run.history[0] == [0.5] * 4 and run.final == [0.9, 0.1, 0.8, 0.2]
    text = trajectory_markdown([run])
    assert "| 0* | 0.500 | 0.900 |" in text and "| 1 | 0.500 | 0.100 |" in text
    (tmp_path / "a" / "gates.csv").unlink()
    with pytest.raises(UserError, match="has no gate history"):
        load_run(tmp_path / "a")


@pytest.mark.parametrize("kind,suffix", [("heatmap", ".png"), ("heatmap", ".svg"), ("trajectory", ".pdf"), ("trajectory", ".png")])
def test_plot_writes_readable_images_and_tables(tmp_path, kind, suffix):
    runs = [fake_run(tmp_path, f"r{i}", t, i, [0.2 + 0.1 * i, 0.6, 0.4 - 0.1 * i]) for i, t in enumerate(["sst2", "rte", "cb"])]
    image, summary = tmp_path / f"fig{suffix}", tmp_path / "fig.md"
    assert isinstance(plot(runs, image, kind=kind), Figure)
    data = image.read_bytes()
    assert data[:4] == {".png": b"\x89PNG", ".svg": b"<?xm", ".pdf": b"%PDF"}[suffix]
    assert summary.read_text().startswith(f"# {kind}")
    if suffix == ".png":
        import matplotlib.image

        pixels = matplotlib.image.imread(image)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and not math.isclose(float(pixels.std()), 0.0)
    with pytest.raises(UserError, match="already exists; pass --force"):
        plot(runs, image, kind=kind)


def test_spt_plot_on_real_tiny_searches(tmp_path, tiny_bert, capsys):
    dirs = []
    for seed in (1, 2):
        (tmp_path / f"c{seed}").mkdir()
        config = tiny_config(tmp_path / f"c{seed}", tiny_bert, search={"epochs": 1})
        out = tmp_path / f"run{seed}"
        assert main(["search", str(config), "--out", str(out), "--quiet", "--set", f"seed={seed}"]) == 0
        dirs.append(str(out))
    capsys.readouterr()
    assert main(["plot", *dirs, "--kind", "heatmap", "--by", "seed", "--out", str(tmp_path / "h.png")]) == 0
    printed = capsys.readouterr().out
    assert "| 0 (emb)" in printed and (tmp_path / "h.md").is_file()
    assert main(["plot", *dirs, "--kind", "trajectory", "--out", str(tmp_path / "t.svg")]) == 0
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err


# ---------------------------------------------------------------------- the figures themselves


def _heatmap_axes(fig: Figure):
    return next(ax for ax in fig.axes if ax.images and ax.images[0].colorbar is not None)


def _cell_rgba(fig: Figure, row: int, col: int) -> tuple[float, ...]:
    """The colour the figure paints cell (row, col) with, read from its image's data, norm and colormap."""
    image = _heatmap_axes(fig).images[0]
    return tuple(float(v) for v in image.to_rgba(image.get_array())[row, col])


def test_heatmap_colour_scale_is_fixed_unless_vmax_auto(tmp_path):
    low = heatmap_data([load_run(fake_run(tmp_path, "low", "sst2", 1, [0.5, 0.6, 0.7]))])
    high = heatmap_data([load_run(fake_run(tmp_path, "high", "rte", 1, [0.5, 0.9, 0.2]))])
    fig_low, fig_high = render_heatmap(low), render_heatmap(high)
    assert isinstance(fig_low, Figure)
    # layer 0 holds 0.5 in both: the same colour, although the maxima are 0.7 and 0.9
    assert _cell_rgba(fig_low, 0, 0) == _cell_rgba(fig_high, 0, 0) == pytest.approx(matplotlib.colormaps["viridis"](0.5))
    image = _heatmap_axes(fig_low).images[0]
    assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    assert image.colorbar.ax.get_ylabel().startswith("gate α as ranked")
    auto_low, auto_high = render_heatmap(low, vmax="auto"), render_heatmap(high, vmax="auto")
    assert _heatmap_axes(auto_low).images[0].norm.vmax == pytest.approx(0.7)
    assert _cell_rgba(auto_low, 0, 0) != pytest.approx(_cell_rgba(auto_high, 0, 0))
    assert _cell_rgba(auto_low, 2, 0) == pytest.approx(matplotlib.colormaps["viridis"](1.0))  # the top of its own scale
    freq = render_heatmap(heatmap_data([load_run(tmp_path / "low")], value="frequency"))
    assert _heatmap_axes(freq).images[0].colorbar.ax.get_ylabel().startswith("selection frequency")
    with pytest.raises(UserError, match=r"--vmax: give a number in \(0, 1\] or auto"):
        render_heatmap(low, vmax="most")


def test_heatmap_columns_count_their_runs_and_the_title_names_what_runs_share(tmp_path):
    runs = [load_run(fake_run(tmp_path, f"a{i}", "sst2", i, [0.9, 0.1, 0.8, 0.2], k=3)) for i in range(3)]
    runs.append(load_run(fake_run(tmp_path, "b", "rte", 1, [0.1, 0.9, 0.2, 0.7], k=3)))
    fig = render_heatmap(heatmap_data(runs, by="task"))
    ax = _heatmap_axes(fig)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sst2\nn = 3", "rte\nn = 1"]
    assert ax.get_title() == "Gate α by task: minilm-l6 · K=3"  # seeds differ, so no seed in the title
    by_seed = _heatmap_axes(render_heatmap(heatmap_data(runs, by="seed", value="frequency")))
    assert [t.get_text() for t in by_seed.get_xticklabels()] == ["0\nn = 1", "1\nn = 2", "2\nn = 1"]
    assert by_seed.get_title() == "Selection frequency by seed: minilm-l6 · K=3"


def _boxes(fig: Figure):
    from matplotlib.patches import Rectangle

    return [p for p in _heatmap_axes(fig).patches if isinstance(p, Rectangle)]


def test_exactly_one_selection_box_per_selected_cell(tmp_path):
    runs = [
        load_run(fake_run(tmp_path, "a1", "sst2", 1, [0.9, 0.1, 0.8, 0.2])),
        load_run(fake_run(tmp_path, "a2", "sst2", 2, [0.7, 0.3, 0.2, 0.6])),
        load_run(fake_run(tmp_path, "b1", "rte", 1, [0.1, 0.9, 0.2, 0.7])),
    ]
    data = heatmap_data(runs)
    boxes = _boxes(render_heatmap(data))
    assert len(boxes) == sum(map(sum, data.marked)) == 3
    assert sorted((b.get_x() + 0.5, b.get_y() + 0.5, b.get_height()) for b in boxes) == [(0, 0, 1), (1, 1, 1), (1, 3, 1)]
    # 3 layers over 6 depth rows: the selected layer 0 of the small backbone is one cell two rows high, one box
    small = load_run(fake_run(tmp_path, "s", "sst2", 1, [0.9, 0.1, 0.5], k=1))
    large = load_run(fake_run(tmp_path, "l", "sst2", 1, [0.1, 0.2, 0.3, 0.4, 0.5, 0.95], k=1, backbone="mpnet-base"))
    fig = render_heatmap(heatmap_data([small, large], by="backbone", align="depth"))
    boxes = sorted((b.get_x() + 0.5, b.get_y() + 0.5, b.get_height()) for b in _boxes(fig))
    assert boxes == [(0, 0, 2), (1, 5, 1)]
    values = [t.get_text() for t in _heatmap_axes(fig).texts]
    assert values.count("0.90") == 1 and values.count("0.10") == 2  # one value per cell (small 0.10, large 0.10)


def test_plot_options_size_dpi_font_size_and_embedded_fonts(tmp_path):
    runs = [fake_run(tmp_path, f"r{i}", t, i, [0.2 + 0.1 * i, 0.6, 0.4 - 0.1 * i]) for i, t in enumerate(["sst2", "rte"])]
    fig = plot(runs, tmp_path / "small.png", size=(4, 3), dpi=100, font_size=7)
    assert isinstance(fig, Figure)
    assert matplotlib.image.imread(tmp_path / "small.png").shape[:2] == (300, 400)
    plot(runs, tmp_path / "large.png", size=(6, 2.5), dpi=200)
    assert matplotlib.image.imread(tmp_path / "large.png").shape[:2] == (500, 1200)
    big = plot(runs, tmp_path / "big.png", font_size=14)
    assert _heatmap_axes(big).get_yticklabels()[0].get_fontsize() == 14
    assert _heatmap_axes(fig).get_yticklabels()[0].get_fontsize() == 7
    before = dict(matplotlib.rcParams)
    for kind in ("heatmap", "trajectory"):
        pdf = tmp_path / f"{kind}.pdf"
        plot(runs, pdf, kind=kind)
        data = pdf.read_bytes()
        assert b"/FontFile2" in data and b"/Type3" not in data, kind
        svg = tmp_path / f"{kind}-text.svg"
        plot(runs, svg, kind=kind)
        assert "<text" in svg.read_text() and "sst2" in svg.read_text()  # text stays text
    assert dict(matplotlib.rcParams) == before  # nothing set globally
    # a figure restyled in a notebook and saved again keeps TrueType fonts
    fig.axes[0].set_title("restyled")
    save_figure(fig, tmp_path / "again.pdf")
    assert b"/Type3" not in (tmp_path / "again.pdf").read_bytes()
    with pytest.raises(UserError, match=r"--dpi: must be in \[10, 1200\] dots per inch, got 0"):
        plot(runs, tmp_path / "bad.png", dpi=0)
    assert not (tmp_path / "bad.png").exists()


def test_spt_plot_cli_passes_the_options_through(tmp_path, capsys):
    runs = [str(fake_run(tmp_path, f"r{i}", t, i, [0.2, 0.6, 0.4])) for i, t in enumerate(["sst2", "rte"])]
    out = tmp_path / "h.png"
    assert main(["plot", *runs, "--out", str(out), "--size", "5", "2", "--dpi", "80", "--font-size", "6", "--vmax", "auto"]) == 0
    assert matplotlib.image.imread(out).shape[:2] == (160, 400)
    assert "wrote" in capsys.readouterr().out and (tmp_path / "h.md").is_file()
    assert main(["plot", *runs, "--out", str(tmp_path / "x.png"), "--vmax", "2"]) == 2
    assert "--vmax: give a number in (0, 1] or auto" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.md").exists()


def _contrast_on_white(color) -> float:
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in matplotlib.colors.to_rgb(color))
    return 1.05 / (0.2126 * r + 0.7152 * g + 0.0722 * b + 0.05)


def test_trajectories_are_legible_distinct_and_labelled_without_overlap(tmp_path):
    # three seeds of one task whose selected gates end within 0.01 of each other
    finals = [0.81, 0.80, 0.82, 0.3, 0.2, 0.79, 0.1, 0.15, 0.25, 0.35, 0.45, 0.05]
    runs = [load_run(fake_run(tmp_path, f"s{i}", "rte", i, finals, k=3)) for i in range(3)]
    fig = render_trajectories(runs)
    panels = [ax for ax in fig.axes if ax.lines]
    assert [ax.get_title().split("\n")[0] for ax in panels] == ["seed 0", "seed 1", "seed 2"]
    assert fig.get_suptitle() == "Gate trajectories: rte · minilm-l6 · K=3"
    for ax in panels:
        styles = [(matplotlib.colors.to_hex(line.get_color()), line.get_linestyle()) for line in ax.lines]
        assert len(set(styles)) == len(finals)  # 12 layers, 12 distinct (colour, line style) pairs
        assert min(_contrast_on_white(line.get_color()) for line in ax.lines) >= 2.0  # no pale yellow on white
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in panels:
        assert not legend.overlaps(ax.get_window_extent(renderer))  # the legend sits outside the panels
        labels = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text alone, not its leader line
        assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "2"]
        assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    # runs that differ in nothing shown still get distinct panel titles
    twins = [load_run(fake_run(tmp_path / d, "run", "cb", 42, [0.4, 0.6])) for d in ("x", "y")]
    titles = [ax.get_title().split("\n")[0] for ax in render_trajectories(twins).axes if ax.lines]
    assert len(set(titles)) == 2
    mixed = [load_run(tmp_path / "s0"), load_run(fake_run(tmp_path, "m", "cb", 0, [0.4, 0.6, 0.5], k=1, backbone="mpnet-base"))]
    titles = [ax.get_title().split("\n")[0] for ax in render_trajectories(mixed).axes if ax.lines]
    assert titles == ["rte · minilm-l6 · K=3", "cb · mpnet-base · K=1"]


def test_comparison_plot_shows_points_with_error_bars(tmp_path):
    from matplotlib.container import BarContainer, ErrorbarContainer
    from matplotlib.patches import Rectangle

    summary = [
        {"strategy": "spt", "runs": 3, "dev": 0.80, "dev_std": 0.02, "test": 0.78, "test_std": 0.03, "trainable_params": 39362},
        {"strategy": "first", "runs": 3, "dev": 0.74, "dev_std": 0.04, "test": 0.73, "test_std": 0.01, "trainable_params": 13634},
    ]
    fig = plot_comparison(summary, "accuracy", tmp_path / "compare.pdf", "sst2 on minilm-l6, K=3")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert not bars and not [p for p in ax.patches if isinstance(p, Rectangle)]
    errorbars = {c.get_label().split()[0]: c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert set(errorbars) == {"dev", "test"}
    points, _, (segments,) = errorbars["test"].lines
    assert list(points.get_ydata()) == pytest.approx([78.0, 73.0])
    assert [seg[:, 1].tolist() for seg in segments.get_segments()] == [pytest.approx([75.0, 81.0]), pytest.approx([72.0, 74.0])]
    assert ax.get_title() == "sst2 on minilm-l6, K=3"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["spt\n39k params", "first\n14k params"]
    assert b"/Type3" not in (tmp_path / "compare.pdf").read_bytes()


def test_gallery_script_regenerates_the_readme_figures(tmp_path):
    import importlib.util

    from search.comparison import write_rows_csv

    spec = importlib.util.spec_from_file_location("make_gallery", Path(__file__).parent.parent / "docs" / "figures" / "make_gallery.py")
    gallery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gallery)
    runs = [str(fake_run(tmp_path, t, t, 42, [0.2, 0.7, 0.6, 0.3], k=2)) for t in ("sst2", "rte", "cb")]
    cmp = tmp_path / "cmp-sst2"
    cmp.mkdir()
    write_rows_csv([{"strategy": s, "seed": seed, "draw": "", "layers": "[1]", "dev": 0.7 + 0.01 * seed, "test": 0.6 + 0.02 * seed,
                     "trainable_params": 100, "search_steps": 0, "search_seconds": 0, "train_steps": 1, "train_seconds": 1}
                    for s in ("spt", "first") for seed in (1, 2)], cmp / "compare.csv")
    out = tmp_path / "figures"
    assert gallery.main(["--heatmap", *runs, "--trajectory", *runs, "--compare", str(cmp), "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cmp-sst2-compare.md", "cmp-sst2-compare.png", "minilm-heatmap-tasks.md", "minilm-heatmap-tasks.png",
        "minilm-trajectories.md", "minilm-trajectories.png",
    ]
    assert (out / "minilm-heatmap-tasks.md").read_text().startswith("# MiniLM-L6: gates as ranked, per task")
    assert "| spt | 2 | 71.5 ± 0.7 | 63.0 ± 1.4 |" in (out / "cmp-sst2-compare.md").read_text()
