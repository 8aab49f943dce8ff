"""Issue 29: every file spt reads back is validated.

A damaged or hand-edited ``prompt_config.json``, weights file, checkpoint (its training
state, optimizer and callback records), history (``gates.csv``, ``steps.csv``,
``metrics.csv``), ``status.json``, ``config.yaml``, manifest, mask or ``metrics.json`` ends
in one ``error: <file>: <field>: <problem>`` line with exit status 2, and nothing is
written: a resumed run is refused before it touches its directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import refused, snapshot, tiny_config
from safetensors import safe_open
from safetensors.torch import save_file

from search.callbacks import Checkpointer
from search.checkpoint import CHECKPOINT_FILE, RETRAIN_CHECKPOINT_FILE
from search.cli import main
from spt.files import CHECKSUM_KEY

# 24 examples, batch 4: a search of 2 epochs x 3 steps, interrupted after its checkpoint at
# step 4 (epoch 1, batch 1); a retraining of 2 epochs x 6 steps, interrupted after step 4.
RETRAIN = {"epochs": 2, "eval_every": 2}


def _interrupted(args: list[str], file: str, step: int) -> None:
    """Run ``spt args`` and stop it (Ctrl-C) right after ``file`` is saved at ``step``."""
    original = Checkpointer.on_step_end

    def save_then_interrupt(self, trainer, state, scheduled, stats):
        original(self, trainer, state, scheduled, stats)
        if self.path.name == file and state.step == step:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "on_step_end", save_then_interrupt)
        assert main(args) == 130


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """A config; a search and a run (search done, retraining) each interrupted after a
    checkpoint at step 4; the run, finished (its sparse model saved); texts to label."""
    root = tmp_path_factory.mktemp("schemas")
    config = tiny_config(root, tiny_models["bert"], retrain=RETRAIN)
    paths = {"config": config, "search": root / "search", "retrain": root / "retrain", "finished": root / "finished"}
    _interrupted(["search", str(config), "--out", str(paths["search"]), "--quiet"], CHECKPOINT_FILE, 4)
    _interrupted(["run", str(config), "--out", str(paths["retrain"]), "--quiet"], RETRAIN_CHECKPOINT_FILE, 4)
    shutil.copytree(paths["retrain"], paths["finished"])
    assert main(["run", str(config), "--out", str(paths["finished"]), "--quiet"]) == 0
    (root / "texts.txt").write_text("a great film\ni hate this plot\n")
    paths["texts"] = root / "texts.txt"
    return paths


def _copy(made: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return shutil.copytree(made[name], tmp_path / name)


def _rewrite(path: Path, change: Callable[[dict[str, str]], None]) -> None:
    """Change the metadata of a safetensors file (its tensors, and so their checksums, stay)."""
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    change(metadata)
    save_file(tensors, str(path), metadata=metadata)


def _edit(key: str, change: Callable[[dict], object]) -> Callable[[dict[str, str]], None]:
    """A metadata change: the JSON entry ``key`` edited in place by ``change``."""
    def edit(metadata: dict[str, str]) -> None:
        value = json.loads(metadata[key])
        change(value)
        metadata[key] = json.dumps(value)
    return edit


def _set(key: str, text: str) -> Callable[[dict[str, str]], None]:
    return lambda metadata: metadata.__setitem__(key, text)


# ------------------------------------------------------------------ a saved model


def _json_edit(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    """An edit of the JSON file ``name`` in a folder: ``change`` alters its data in place."""
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        change(data)
        (folder / name).write_text(json.dumps(data))
    return edit


def _config_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return _json_edit("prompt_config.json", change)


def _other_layers(config: dict) -> None:
    others = [layer for layer in range(config["num_layers"]) if layer not in config["layers"]]
    config["layers"] = sorted([others[0], *config["layers"][1:]])  # as many layers: the shapes still fit


MODEL_EDITS = {
    "prompt-missing": (_config_edit(lambda c: c.pop("prompt")), "prompt_config.json: prompt: missing"),
    "layers-text": (_config_edit(lambda c: c.update(layers="1,3")), "prompt_config.json: layers: expected a list of integers, got '1,3'"),
    "labels-numbers": (_config_edit(lambda c: c.update(labels=[0, 1])), "prompt_config.json: labels: expected a list of strings, got [0, 1]"),
    "num-layers-text": (_config_edit(lambda c: c.update(num_layers="4")), "prompt_config.json: num_layers: expected an integer, got '4'"),
    "layer-beyond": (_config_edit(lambda c: c.update(layers=[1, 9])), "prompt_config.json: layers: must be below num_layers (4), got [1, 9]"),
    "length-text": (_config_edit(lambda c: c["prompt"].update(length="x")), "prompt_config.json: prompt.length: expected an integer, got 'x'"),
    "length-edited": (_config_edit(lambda c: c["prompt"].update(length=4)),
                      "prompt_config.json: prompt.length: 4 is not what prompt_weights.safetensors was saved with (3)"),
    "other-layers": (_config_edit(_other_layers), "is not what prompt_weights.safetensors was saved with"),
    "fingerprint-removed": (_config_edit(lambda c: c.pop("backbone_fingerprint")), "prompt_config.json: backbone_fingerprint: missing"),
    "checksums-removed": (lambda m: _rewrite(m / "prompt_weights.safetensors", lambda md: md.pop(CHECKSUM_KEY)),
                          "prompt_weights.safetensors has no checksum list"),
    "record-removed": (lambda m: _rewrite(m / "prompt_weights.safetensors", lambda md: md.pop("spt_config")),
                       "prompt_weights.safetensors: spt_config: missing"),
}


@pytest.mark.parametrize("edit, problem", MODEL_EDITS.values(), ids=MODEL_EDITS.keys())
def test_a_damaged_or_edited_saved_model_is_refused(made, tmp_path, capsys, edit, problem):
    run = _copy(made, "finished", tmp_path)
    edit(run / "sparse")
    before, output = snapshot(run), tmp_path / "predictions.jsonl"
    line = refused(capsys, ["predict", str(run), "--input", str(made["texts"]), "--output", str(output)], problem)
    assert str(run / "sparse") in line and line.endswith(f"save the model again (rerun the spt command that wrote {run / 'sparse'})")
    assert snapshot(run) == before and not output.exists()


def test_a_model_saved_before_checksums_loads_with_a_warning_one_claiming_a_later_release_does_not(made, tmp_path):
    """Saves are told apart by the spt-search that wrote them: before 0.1.0 recorded its version
    there was no fingerprint; 0.2.0 wrote checksums into every file; format 3 records its config."""
    from spt import SparsePromptModel
    from spt.errors import UserError

    model = _copy(made, "finished", tmp_path) / "sparse"
    saved = json.loads((model / "prompt_config.json").read_text())
    _config_edit(lambda c: [c.update(version=2), c.pop("spt_search_version"), c.pop("backbone_fingerprint")])(model)
    _rewrite(model / "prompt_weights.safetensors", lambda md: [md.pop(CHECKSUM_KEY), md.pop("spt_config")])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("spt").addHandler(handler)
    try:
        assert SparsePromptModel.from_pretrained(model).predict(["a great film"])[0]["label"] in ("0", "1")
    finally:
        logging.getLogger("spt").removeHandler(handler)
    (warning,) = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert "without checksums or a record of its config" in warning
    assert f"spt.save_prompt_model(spt.load_prompt_model({str(model)!r}), {str(model)!r})" in warning
    _config_edit(lambda c: c.update(spt_search_version="0.1.0"))(model)  # 0.1.0 recorded the fingerprint with it
    with pytest.raises(UserError, match="prompt_config.json: backbone_fingerprint: missing, though spt-search 0.1.0 records it"):
        SparsePromptModel.from_pretrained(model)
    _config_edit(lambda c: c.update(spt_search_version="0.2.0", backbone_fingerprint=saved["backbone_fingerprint"]))(model)
    with pytest.raises(UserError, match="prompt_weights.safetensors has no checksum list"):  # 0.2.0 wrote them everywhere
        SparsePromptModel.from_pretrained(model)


# ------------------------------------------------------------------ checkpoints


CHECKPOINT_EDITS = {
    "step-text": (_edit("state", lambda s: s.update(step="abc")), "state.step: expected an integer, got 'abc'"),
    "step-negative": (_edit("state", lambda s: s.update(step=-1)), "state.step: must be at least 0, got -1"),
    "step-float": (_edit("state", lambda s: s.update(step=4.5)), "state.step: expected an integer, got 4.5"),
    "epoch-99": (_edit("state", lambda s: s.update(epoch=99)), "state.epoch: 99 is beyond this search's 2 epochs"),
    "step-off": (_edit("state", lambda s: s.update(step=5)),
                 "state.step: 5 is not the step of epoch 1, batch 1 (4) of this search"),
    "batch-beyond": (_edit("state", lambda s: s.update(batch_in_epoch=7, step=10)),
                     "state.batch_in_epoch: 7 is beyond the 3 steps of epoch 1 of this search"),
    "state-missing": (lambda m: m.pop("state"), "state: missing"),
    "state-list": (_set("state", "[4, 1]"), "state: expected a mapping, got [4, 1]"),
    "optimizers-not-json": (_set("optimizers", "{"), "optimizers: not valid JSON"),
    "param-groups-text": (_edit("optimizers", lambda o: o["omega"].update(param_groups="x")),
                          "optimizers.omega.param_groups: expected a list of mappings, got 'x'"),
    "lr-text": (_edit("optimizers", lambda o: o["arch"]["param_groups"][0].update(lr="fast")),
                "optimizers.arch.param_groups.0.lr: expected a number, got 'fast'"),
    "params-cut": (_edit("optimizers", lambda o: o["omega"]["param_groups"][0].update(params=[0])),
                   "not a model, callback or optimizer tensor of this checkpoint"),
    "counts-text": (_edit("callbacks", lambda c: c["metrics"].update(counts="x")),
                    "callbacks.metrics.counts: expected a mapping, got 'x'"),
    "no-checksums": (lambda m: m.pop(CHECKSUM_KEY), "has no checksum list (spt_sha256 in its metadata)"),
}


@pytest.mark.parametrize("edit, problem", CHECKPOINT_EDITS.values(), ids=CHECKPOINT_EDITS.keys())
def test_a_damaged_search_checkpoint_is_refused_before_the_resume_writes_anything(made, tmp_path, capsys, edit, problem):
    run = _copy(made, "search", tmp_path)
    _rewrite(run / CHECKPOINT_FILE, edit)
    before = snapshot(run)
    line = refused(capsys, ["search", str(made["config"]), "--out", str(run), "--quiet"], problem)
    if problem.startswith("has no checksum"):
        assert line.startswith(f"error: checkpoint: {run / CHECKPOINT_FILE} has no checksum list")
    else:
        assert line.startswith(f"error: checkpoint: {run / CHECKPOINT_FILE}: ")
    assert line.endswith("delete checkpoint.safetensors to restart this search from its beginning, or start over with --force")
    assert snapshot(run) == before  # no log, no gate row, no manifest entry


def test_a_retraining_checkpoint_beyond_its_epochs_is_refused_before_the_resume_writes_anything(made, tmp_path, capsys):
    run = _copy(made, "retrain", tmp_path)
    _rewrite(run / RETRAIN_CHECKPOINT_FILE, _edit("state", lambda s: s.update(epoch=99)))
    before = snapshot(run)
    line = refused(capsys, ["run", str(made["config"]), "--out", str(run), "--quiet"],
                   f"error: checkpoint: {run / RETRAIN_CHECKPOINT_FILE}: state.epoch: 99 is beyond this retrain's 2 epochs")
    assert "delete retrain_checkpoint.safetensors to restart this retraining" in line
    assert snapshot(run) == before


# ------------------------------------------------------------------ histories


def _lines(path: Path, keep: Callable[[list[str]], list[str]]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        lines = (run / path).read_text().splitlines()
        (run / path).write_text("".join(line + "\n" for line in keep(lines)))
    return edit


HISTORY_EDITS = {
    "gates-header-only": (_lines(Path("gates.csv"), lambda lines: lines[:1]),
                          "gates.csv: the row of step 0, epoch 0, layer 0 is missing"),
    "gates-garbled": (_lines(Path("gates.csv"), lambda lines: [*lines[:3], "3,0,x,0.5", *lines[4:]]),
                      "gates.csv line 4: not a valid row: 3,0,x,0.5"),
    "gates-step-cut": (_lines(Path("gates.csv"), lambda lines: [line for line in lines if not line.startswith("2,")]),
                       "gates.csv: the row of step 2, epoch 0, layer 0 is missing"),
    "steps-header-only": (_lines(Path("steps.csv"), lambda lines: lines[:1]), "steps.csv: the row of step 1, epoch 1 is missing"),
    "steps-garbled": (_lines(Path("steps.csv"), lambda lines: [lines[0], "search,1,1,abc,,,,", *lines[2:]]),
                      "steps.csv line 2: not a valid row: search,1,1,abc"),
    "metrics-header-only": (_lines(Path("metrics.csv"), lambda lines: lines[:1]),
                            "metrics.csv: the row of epoch 1, step 3 is missing"),
    "metrics-garbled": (_lines(Path("metrics.csv"), lambda lines: [lines[0], lines[1].replace("search,1,3", "search,one,3")]),
                        "metrics.csv line 2: not a valid row: search,one,3"),
}


@pytest.mark.parametrize("edit, problem", HISTORY_EDITS.values(), ids=HISTORY_EDITS.keys())
def test_a_history_cut_or_garbled_before_the_checkpoint_refuses_the_resume(made, tmp_path, capsys, edit, problem):
    run = _copy(made, "search", tmp_path)
    edit(run)
    before = snapshot(run)
    line = refused(capsys, ["search", str(made["config"]), "--out", str(run), "--quiet"], f"error: {run}/{problem}")
    assert line.endswith("the history up to it must be whole: start the search over with --force")
    assert snapshot(run) == before  # the rows are not cut, nothing is appended


# ------------------------------------------------------------------ run files


def _yaml_edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        data = yaml.safe_load((run / "config.yaml").read_text())
        change(data)
        (run / "config.yaml").write_text(yaml.safe_dump(data))
    return edit


RUN_FILE_EDITS = {  # edit, the run it damages, the command that reads it, the refusal
    "status-steps": (_json_edit("status.json", lambda s: s["search"].update(steps="x")), "retrain", "run",
                     "status.json: search.steps: expected an integer, got 'x'"),
    "status-seconds": (_json_edit("status.json", lambda s: s["search"].update(seconds="fast")), "retrain", "run",
                       "status.json: search.seconds: expected a number, got 'fast'"),
    "status-alphas": (_json_edit("status.json", lambda s: s["search"].update(alphas=[0.5, 7])), "retrain", "run",
                      "status.json: search.alphas: must be gates in [0, 1], got [0.5, 7.0]"),
    "status-entry": (_json_edit("status.json", lambda s: s.update(search="done")), "retrain", "run",
                     "status.json: search: expected a mapping of fields, got 'done'"),
    "config-section-text": (_yaml_edit(lambda c: c.update(task="toy")), "finished", "predict",
                            "config.yaml: task: expected a mapping or null, got 'toy'"),
    "config-list": (lambda run: (run / "config.yaml").write_text("- 1\n- 2\n"), "finished", "predict",
                    "config.yaml: is damaged (not a mapping of config sections)"),
    "manifest-stages": (_json_edit(".spt-manifest.json", lambda m: m.update(stages=[["search"]])), "search", "search",
                        ".spt-manifest.json is damaged (stages: expected a list of strings, got [['search']])"),
    "mask-params": (_json_edit("layer_mask.json", lambda m: m.update(trainable_params=-5)), "finished", "retrain",
                    "layer_mask.json: field trainable_params must be at least 0, got -5"),
}


@pytest.mark.parametrize("edit, name, command, problem", RUN_FILE_EDITS.values(), ids=RUN_FILE_EDITS.keys())
def test_a_damaged_run_file_is_refused_naming_file_and_field(made, tmp_path, capsys, edit, name, command, problem):
    run = _copy(made, name, tmp_path)
    edit(run)
    before = snapshot(run)
    config, out = str(made["config"]), tmp_path / "out"
    args = {"run": ["run", config, "--out", str(run), "--quiet"], "search": ["search", config, "--out", str(run), "--quiet"],
            "predict": ["predict", str(run), "--input", str(made["texts"]), "--output", str(out)],
            "retrain": ["retrain", config, "--mask", str(run / "layer_mask.json"), "--out", str(out), "--quiet"]}[command]
    refused(capsys, args, f"{run}/{problem}")
    assert snapshot(run) == before and not out.exists()


def test_spt_runs_says_a_metrics_file_with_a_mistyped_field_is_damaged(made, tmp_path, capsys):
    import csv

    run = _copy(made, "finished", tmp_path)
    _json_edit("metrics.json", lambda m: m.update(retrain_steps="twelve"))(run)
    before = snapshot(run)
    assert main(["runs", str(run), "--format", "csv"]) == 0
    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert row["note"] == "damaged: metrics.json" and row["dev"] != ""  # what is readable still shows
    assert snapshot(run) == before
