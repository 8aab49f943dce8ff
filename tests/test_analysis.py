"""Heatmaps and trajectories: the data behind the figures, the files, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

from analysis import heatmap_data, load_run, plot, trajectory_markdown
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
    image, summary = plot(runs, tmp_path / f"fig{suffix}", kind=kind)
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
