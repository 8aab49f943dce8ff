"""Using a trained model and following a run: predict/evaluate, portable save/load, metric
history, schedules, accumulation, early stopping, quiet logs when output is redirected."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_sentiment_tsv

from search.cli import main
from search.config import RetrainConfig, load_config
from search.feed import Feed
from search.pipeline import build_sparse, prepare
from search.schedule import lr_factor
from search.trainer import Trainer
from spt import SparsePromptModel
from spt.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_models):
    """A tiny search + retrain, its backbone copied beside it (so the tree can move as a whole)."""
    root = tmp_path_factory.mktemp("product")
    model_dir = shutil.copytree(tiny_models["bert"], root / "backbone")
    config = tiny_config(root, model_dir, n_train=32, retrain={"epochs": 3})
    run = root / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    return root, run


def test_predictions_on_a_held_back_file_score_as_evaluate_says(finished_run, capsys):
    root, run = finished_run
    held_back = write_sentiment_tsv(root / "held_back.tsv", 20, seed=9)
    out = root / "preds.jsonl"
    assert main(["predict", str(run), "--input", str(held_back), "--format", "task", "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 20 and all(set(r) == {"id", "label", "probabilities", "gold"} for r in records)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 and r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in records)
    accuracy = sum(r["label"] == r["gold"] for r in records) / len(records)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--input", str(held_back), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(accuracy)
    # the run's own test split: the same score the run reported
    assert main(["evaluate", str(run), "--json"]) == 0
    reported = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(reported)


def test_plain_text_lines_and_the_python_api_agree(finished_run, capsys):
    root, run = finished_run
    (root / "texts.txt").write_text("a great film\n\nso boring and dull\n")
    assert main(["predict", str(run), "--input", str(root / "texts.txt")]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = SparsePromptModel.from_pretrained(run / "sparse")
    assert not model.training and model.max_length == 32
    api = model.predict(["a great film", "so boring and dull"])
    assert [r["id"] for r in cli] == ["line 1", "line 3"]
    for c, a in zip(cli, api):
        assert c["label"] == a["label"] and c["probabilities"] == pytest.approx(a["probabilities"], abs=1e-6)


def test_a_moved_run_loads_and_predicts_identically(finished_run, tmp_path):
    root, run = finished_run
    texts = ["a great film", "i hate this plot"]
    before = SparsePromptModel.from_pretrained(run / "sparse").predict(texts)
    saved = json.loads((run / "sparse" / "prompt_config.json").read_text())
    assert not Path(saved["backbone"]).is_absolute() and "backbone_fingerprint" in saved
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "tree")  # run and backbone move together
    after = SparsePromptModel.from_pretrained(moved / "run" / "sparse").predict(texts)
    assert _probabilities(after) == pytest.approx(_probabilities(before), abs=1e-6)
    alone = shutil.copytree(run, tmp_path / "alone")  # the run alone: the backbone must be named
    from spt.errors import UserError

    with pytest.raises(UserError, match=r"model.backbone: cannot load the backbone .*pass the backbone"):
        SparsePromptModel.from_pretrained(alone / "sparse")
    named = SparsePromptModel.from_pretrained(alone / "sparse", backbone=str(root / "backbone")).predict(texts)
    assert _probabilities(named) == pytest.approx(_probabilities(before), abs=1e-6)
    with pytest.raises(UserError, match="trained on another backbone"):  # a different backbone is refused
        SparsePromptModel.from_pretrained(alone / "sparse", backbone=str(_other_bert(tmp_path)))
    assert "from_pretrained" in (run / "sparse" / "README.md").read_text()


def _probabilities(results: list[dict]) -> list[float]:
    return [p for r in results for p in r["probabilities"].values()]


def _other_bert(tmp_path: Path) -> Path:
    from conftest import make_tiny_model

    return make_tiny_model(tmp_path / "other", "bert", seed=5)


def test_metric_history_has_a_row_per_epoch_and_a_log_line(finished_run):
    _, run = finished_run
    lines = (run / "metrics.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    assert header[:4] == ["stage", "epoch", "step", "seconds"] and header[-4:] == ["gate_0", "gate_1", "gate_2", "gate_3"]
    assert [(r[0], r[1]) for r in rows] == [("search", "1"), ("search", "2"), ("retrain", "1"), ("retrain", "2"), ("retrain", "3")]
    assert all(r[header.index("dev")] for r in rows if r[0] == "retrain") and all(r[-1] for r in rows if r[0] == "search")
    log = (run / "log.txt").read_text()
    assert log.count("search epoch") == 2 and log.count("retrain epoch") == 3


def test_tensorboard_events_hold_one_point_per_epoch(tmp_path, tiny_bert):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, tiny_bert, runtime={"tensorboard": True, "progress": False}, retrain={"epochs": 2})
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("search/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("retrain/dev_accuracy")] == [1, 2]
    assert len(events.Scalars("search/gate_3")) == 2


def test_learning_rate_schedules():
    assert [lr_factor(s, 10, "constant", 0.0) for s in (0, 9)] == [1.0, 1.0]
    assert [round(lr_factor(s, 10, "linear", 0.2), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert lr_factor(2, 10, "cosine", 0.2) == pytest.approx(1.0) and lr_factor(6, 10, "cosine", 0.2) == pytest.approx(0.5)


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, tiny_bert):
    """Two batches of 4 accumulated = one batch of 8: the same update (dropout off)."""
    prep = prepare(load_config(tiny_config(tmp_path, tiny_bert, prompt={"dropout": 0.0}, head={"dropout": 0.0})))
    results = []
    for settings, batches in ((RetrainConfig(batch_size=8), [list(range(8))]),
                              (RetrainConfig(batch_size=4, gradient_accumulation_steps=2), [list(range(4)), list(range(4, 8))])):
        model = build_sparse(prep, [0, 2])
        trainer = Trainer(model, settings, Feed(model, prep.train), seed=1)
        for i, batch in enumerate(batches):
            trainer.weight_step(batch, i, update=i == len(batches) - 1)
        results.append({k: v.clone() for k, v in model.trainable_state_dict().items()})
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_early_stopping_ends_a_run_whose_dev_score_stalls(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, retrain={"epochs": 6, "patience": 1, "lr": 1e-9})
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["retrain_steps"] == 2 * 6  # 24 examples, batch 4: 6 steps an epoch; stopped after epoch 2
    assert "early stop at step 12" in (tmp_path / "run" / "log.txt").read_text()


def test_redirected_output_writes_lines_not_bar_frames(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, n_train=200, runtime={"progress": True, "threads": 1}, search={"epochs": 2})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "search", "run", str(config), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and len(done.stderr.encode()) < 5000, len(done.stderr)
    assert "search  10%" in done.stderr and "search 100%" in done.stderr


def test_version_and_runs_table(finished_run, capsys):
    _, run = finished_run
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("spt-search ")
    assert main(["runs", str(run), "--format", "csv"]) == 0
    import csv

    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert row["task"] == "toy" and row["k"] == "2" and row["layers"] == str(json.loads((run / "layer_mask.json").read_text())["selected_layers"])
    assert float(row["test"]) == pytest.approx(json.loads((run / "metrics.json").read_text())["test"]["accuracy"], abs=1e-4)


def test_predict_takes_one_string_as_one_input_and_refuses_what_is_not_text(finished_run):
    _, run = finished_run
    model = SparsePromptModel.from_pretrained(run / "sparse")
    one = model.predict("a great film")
    listed = model.predict(["a great film"])
    assert len(one) == 1 and one[0]["label"] == listed[0]["label"]
    assert one[0]["probabilities"] == pytest.approx(listed[0]["probabilities"], abs=1e-6)
    assert model.predict([]) == []
    for bad, field in ((["fine", 3], "texts"), ([("a", "b", "c")], "texts"), ("fine", "batch_size")):
        with pytest.raises(UserError) as caught:
            model.predict(bad, batch_size=0 if field == "batch_size" else 8)
        assert caught.value.field == field


def test_a_labelled_file_in_another_layout_names_the_layout_the_run_reads(tmp_path, tiny_bert):
    from search.predict import read_inputs

    config = load_config(tiny_config(tmp_path, tiny_bert), ["task.format=label_text", "task.text_a=text"])
    held_back = write_sentiment_tsv(tmp_path / "labelled.tsv", 4)  # a header row "sentence<TAB>label"
    with pytest.raises(UserError) as caught:
        read_inputs(config, held_back, "task")
    assert "label 'sentence' is not in task.labels" in caught.value.problem
    assert "one example per line, the label, a space, then the text (e.g. '0 a short text'" in caught.value.problem
    (tmp_path / "right.txt").write_text("1 a great film\n0 so dull\n")
    assert [ex.label for _, ex in read_inputs(config, tmp_path / "right.txt", "task")] == [1, 0]
