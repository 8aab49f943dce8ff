"""Resumable retraining, the per-step loss history (``steps.csv``) and fp16 training with loss scalers.

Interruptions are Ctrl-C raised from the checkpointing callback (as in test_reliability.py):
right after a checkpoint is saved, or on a step where rows were written but the checkpoint
was not (as a kill between the two would leave them).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import interrupt_checkpointer as _interrupt
from helpers import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from search.callbacks import FiniteCheck
from search.checkpoint import RETRAIN_CHECKPOINT_FILE
from search.cli import main
from search.config import SearchConfig, load_config
from search.feed import Feed
from search.pipeline import build_supernet, prepare
from search.schedule import search_schedule
from search.trainer import Trainer

# 24 examples, batch 4: search 2 epochs x 3 steps (checkpoints at 2, 3, 4, 6); retraining 3 epochs
# x 6 steps, dev every 4 steps (checkpoints at 4, 6, 8, 12...) and early stopping after 2 worse ones.
RETRAIN = {"epochs": 3, "eval_every": 4, "patience": 2}


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def _without_seconds(path: Path) -> list[list[str]]:
    rows = _rows(path)
    column = rows[0].index("seconds")
    return [r[:column] + r[column + 1:] for r in rows]


def _metrics(run: Path) -> dict:
    return {k: v for k, v in json.loads((run / "metrics.json").read_text()).items() if not k.endswith("_seconds")}


def _assert_same_run(reference: Path, run: Path) -> None:
    """Gates, step and epoch histories, metrics and saved weights of ``run`` are ``reference``'s."""
    assert (run / "gates.csv").read_text() == (reference / "gates.csv").read_text()
    assert (run / "steps.csv").read_text() == (reference / "steps.csv").read_text()
    assert _without_seconds(run / "metrics.csv") == _without_seconds(reference / "metrics.csv")
    assert _metrics(run) == _metrics(reference)
    for model in ("supernet", "sparse"):
        ref, new = (load_file(str(d / model / "prompt_weights.safetensors")) for d in (reference, run))
        assert ref.keys() == new.keys()
        for name in ref:
            torch.testing.assert_close(new[name], ref[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_interrupted_search_and_retraining_resume_to_the_uninterrupted_run(tmp_path, tiny_bert, monkeypatch, capsys, precision):
    config = str(tiny_config(tmp_path, tiny_bert, retrain=RETRAIN, runtime={"precision": precision, "progress": False}))
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["run", config, "--out", str(reference), "--quiet"]) == 0
    metrics = json.loads((reference / "metrics.json").read_text())
    # What makes the test bite: the dev-best weights are older than the checkpoint the retraining
    # resumes from (step 8), and early stopping stops at step 12 only if the patience count comes back.
    assert metrics["best_dev_step"] == 4 and metrics["retrain_steps"] == 12

    with monkeypatch.context() as patch:
        _interrupt(patch, "checkpoint.safetensors", step=4, saved=True)
        assert main(["run", config, "--out", str(run), "--quiet"]) == 130
    with monkeypatch.context() as patch:  # rows of steps 9-12 written, the checkpoint still at step 8
        _interrupt(patch, RETRAIN_CHECKPOINT_FILE, step=12, saved=False)
        assert main(["run", config, "--out", str(run), "--quiet"]) == 130
    assert "resuming the search from step 4" in (run / "log.txt").read_text()
    assert "the search or the retraining resumes from its last checkpoint" in capsys.readouterr().err
    assert [r[1] for r in _rows(run / "steps.csv") if r[0] == "retrain"][-1] == "12"
    with safe_open(str(run / RETRAIN_CHECKPOINT_FILE), "pt") as handle:
        saved = handle.metadata()
        assert any(k.startswith("callback.dev.") for k in handle.keys())  # the dev-best weights
    assert json.loads(saved["state"])["step"] == 8
    assert json.loads(saved["identity"])["layers"] == json.loads((run / "layer_mask.json").read_text())["selected_layers"]
    assert ("scalers" in saved) == (precision == "fp16")
    assert {"retrain_checkpoint.safetensors", "steps.csv"} <= set(json.loads((run / ".spt-manifest.json").read_text())["entries"])

    assert main(["run", config, "--out", str(run), "--quiet"]) == 0
    assert "resuming the retraining from step 8" in (run / "log.txt").read_text()
    assert not (run / RETRAIN_CHECKPOINT_FILE).exists()
    _assert_same_run(reference, run)


def test_steps_csv_rows(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, search={"log_every": 2}, retrain={"epochs": 2})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    rows = _rows(run / "steps.csv")
    assert rows[0] == ["stage", "step", "epoch", "loss", "arch_loss", "consistency", "lr", "arch_lr"]
    search = [r for r in rows[1:] if r[0] == "search"]
    retrain = [r for r in rows[1:] if r[0] == "retrain"]
    # Every 2nd search step and each epoch's last (3 steps an epoch); every retraining step.
    assert [(r[1], r[2]) for r in search] == [("2", "1"), ("3", "1"), ("4", "2"), ("6", "2")]
    assert [(r[1], r[2]) for r in retrain] == [(str(s), str(1 + (s - 1) // 6)) for s in range(1, 13)]
    assert all(math.isfinite(float(x)) for r in search for x in r[3:]) and all(float(r[6]) == 3e-3 for r in rows[1:])
    assert all(r[4] == r[5] == r[7] == "" for r in retrain)  # a sparse model has no gate step
    # The epoch means in metrics.csv are the means of the logged step losses (every step: retraining).
    epochs = [r for r in _rows(run / "metrics.csv")[1:] if r[0] == "retrain"]
    for epoch in epochs:
        losses = [float(r[3]) for r in retrain if r[2] == epoch[1]]
        assert float(epoch[4]) == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_steps_tensorboard_points_are_not_repeated_after_a_resume(tmp_path, tiny_bert, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = str(tiny_config(tmp_path, tiny_bert, retrain={"epochs": 2, "eval_every": 4},
                             runtime={"tensorboard": True, "progress": False}))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt(patch, RETRAIN_CHECKPOINT_FILE, step=6, saved=False)  # steps 5, 6 logged, checkpoint at 4
        assert main(["run", config, "--out", str(run), "--quiet"]) == 130
    assert main(["run", config, "--out", str(run), "--quiet"]) == 0
    events = EventAccumulator(str(run / "tensorboard" / "steps-retrain"))
    events.Reload()
    assert [e.step for e in events.Scalars("retrain/step_loss")] == list(range(1, 13))
    losses = {int(r[1]): float(r[3]) for r in _rows(run / "steps.csv")[1:] if r[0] == "retrain"}
    assert [e.value for e in events.Scalars("retrain/step_loss")] == pytest.approx([losses[s] for s in range(1, 13)], rel=1e-5)


def test_retrain_resumes_and_refuses_a_checkpoint_of_other_layers(tmp_path, tiny_bert, monkeypatch, capsys):
    config = str(tiny_config(tmp_path, tiny_bert, search={"epochs": 1}, retrain={"epochs": 2}))
    assert main(["search", config, "--out", str(tmp_path / "search"), "--quiet"]) == 0
    mask = json.loads((tmp_path / "search" / "layer_mask.json").read_text())
    other = sorted(set(range(4)) - set(mask["selected_layers"]))
    (tmp_path / "other.json").write_text(json.dumps({**mask, "selected_layers": other,
                                                     "mask": [int(i in other) for i in range(4)]}))
    mine = str(tmp_path / "search" / "layer_mask.json")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["retrain", config, "--mask", mine, "--out", str(reference), "--quiet"]) == 0
    with monkeypatch.context() as patch:
        _interrupt(patch, RETRAIN_CHECKPOINT_FILE, step=6, saved=True)
        assert main(["retrain", config, "--mask", mine, "--out", str(run), "--quiet"]) == 130
    assert "resume the retraining from its last checkpoint" in capsys.readouterr().err
    before = (run / "layer_mask.json").read_text()
    assert main(["retrain", config, "--mask", str(tmp_path / "other.json"), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint: ") and f"was written for layers {mask['selected_layers']}" in err
    assert "delete retrain_checkpoint.safetensors to restart this retraining" in err
    assert (run / "layer_mask.json").read_text() == before  # refused before anything was written
    assert main(["retrain", config, "--mask", mine, "--out", str(run), "--quiet"]) == 0
    assert _metrics(run) == _metrics(reference)
    assert _without_seconds(run / "metrics.csv") == _without_seconds(reference / "metrics.csv")
    assert (run / "steps.csv").read_text() == (reference / "steps.csv").read_text()
    ref, new = (load_file(str(d / "sparse" / "prompt_weights.safetensors")) for d in (reference, run))
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def test_fp16_overflowing_steps_are_skipped_by_the_scaler_not_stopped_as_divergence(tmp_path, tiny_bert):
    config = load_config(tiny_config(tmp_path, tiny_bert), ["runtime.precision=fp16"])
    prep = prepare(config)
    assert next(prep.backbone.parameters()).dtype == torch.float16
    model = build_supernet(prep)
    trainer = Trainer(model, SearchConfig(), Feed(model, prep.train, precision="fp16"), seed=1)
    assert all(p.dtype == torch.float32 for p in trainer.weights + trainer.architect.params)
    # A scale no fp16 gradient survives: the first steps overflow, are skipped, and halve it.
    for scaler in trainer.scalers.values():
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**40})
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    steps = search_schedule(len(prep.train), 0, 4, 0.5, 1, epoch=0)
    state = trainer.fit(steps, [FiniteCheck("search", (1,), len(steps))])  # checks every step: no TrainingDiverged
    assert state.step == len(steps) == 3
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)  # every step skipped
    assert all(s.get_scale() == 2.0 ** (40 - 3) for s in trainer.scalers.values())
    for scaler in trainer.scalers.values():  # a scale that fits: the steps are taken
        scaler.load_state_dict({**scaler.state_dict(), "scale": 2.0**8})
    trainer.fit(search_schedule(len(prep.train), 0, 4, 0.5, 1, epoch=1), [])
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert "gates.logits" in changed and any(n.startswith("generators.") for n in changed)
    assert all(s.get_scale() == 2.0**8 for s in trainer.scalers.values())
    assert torch.isfinite(model.alphas()).all()


def test_a_resumed_retraining_reports_every_dev_score_to_on_eval(tmp_path, tiny_bert, monkeypatch):
    """A retried Optuna trial is a new trial: the resumed training reports the scores from before
    its checkpoint again, so the pruner sees the whole curve an uninterrupted training reports."""
    from search.pipeline import build_sparse, train_and_evaluate
    from search.runs import RunDir

    prep = prepare(load_config(tiny_config(tmp_path, tiny_bert, retrain={"epochs": 2, "eval_every": 3})))

    def train(path: Path) -> list[tuple[int, float]]:
        reported: list[tuple[int, float]] = []
        path.mkdir(exist_ok=True)
        train_and_evaluate(prep, build_sparse(prep, [2, 3]), prep.config.retrain, progress=False, run=RunDir(path),
                           checkpoint=path / RETRAIN_CHECKPOINT_FILE, on_eval=lambda s, v: reported.append((s, v)))
        return reported

    uninterrupted = train(tmp_path / "a")
    assert [s for s, _ in uninterrupted] == [3, 6, 9, 12]
    with monkeypatch.context() as patch:
        _interrupt(patch, RETRAIN_CHECKPOINT_FILE, step=6, saved=True)
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "b")
    assert train(tmp_path / "b") == uninterrupted
