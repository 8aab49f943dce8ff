"""The search side: trainer steps, resume after a kill, selection, masks, run directories."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_same_gates, kill_during_search, spt_command, spt_env, tiny_config

from search.cli import main
from search.config import SearchConfig, load_config
from search.feed import Feed
from search.pipeline import build_supernet, prepare
from search.schedule import search_schedule
from search.selection import Ranking, read_gate_history, read_mask, select_layers
from search.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def _gate_rows(run_dir: Path) -> list[dict]:
    return read_gate_history(run_dir / "gates.csv")


def _final_alphas(run_dir: Path) -> dict[int, float]:
    rows = _gate_rows(run_dir)
    last = max(r["step"] for r in rows)
    return {r["layer"]: r["alpha"] for r in rows if r["step"] == last}


def test_gate_steps_change_only_gates_and_omega_steps_only_generators_and_head(tmp_path, tiny_bert):
    config = load_config(tiny_config(tmp_path, tiny_bert))
    prep = prepare(config)
    model = build_supernet(prep)
    trainer = Trainer(model, SearchConfig(lr=0.05, arch_lr=0.5), Feed(model, prep.train), seed=1)
    batch = list(range(4))

    def snapshot():
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    before = snapshot()
    trainer.architect.step(batch, step=0)
    after = snapshot()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {"gates.logits"}

    trainer.weight_step(batch, step=1)
    final = snapshot()
    changed = {n for n in after if not torch.equal(after[n], final[n])}
    assert changed and all(n.startswith(("generators.", "head.")) for n in changed)
    assert any(n.startswith("generators.") for n in changed) and "gates.logits" not in changed


def test_search_schedule_splits_d1_d2_freshly_each_epoch():
    steps0 = search_schedule(20, warmup_epochs=1, batch_size=4, d1_fraction=0.5, seed=3, epoch=0)
    assert all(s.arch is None for s in steps0) and sum(len(s.omega) for s in steps0) == 20  # warm-up: all of train
    steps1 = search_schedule(20, 1, 4, 0.5, 3, epoch=1)
    d1 = {i for s in steps1 for i in s.omega}
    d2 = {i for s in steps1 for i in s.arch}
    assert len(d1) == 10 and len(d2) == 10 and not d1 & d2
    steps2 = search_schedule(20, 1, 4, 0.5, 3, epoch=2)
    assert {i for s in steps2 for i in s.omega} != d1
    assert steps1 == search_schedule(20, 1, 4, 0.5, 3, epoch=1)  # the seed fixes the split
    assert [s.last for s in steps1] == [False, False, True]


def test_tiny_run_writes_history_mask_metrics_and_select_agrees(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, select={"average_last": 1})  # rank by the final gates
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    for name in ("config.yaml", "environment.json", "gates.csv", "layer_mask.json", "metrics.json", "log.txt",
                 "summary.md", "supernet/prompt_weights.safetensors", "sparse/prompt_config.json"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoint.safetensors").exists()
    rows = _gate_rows(run)
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and len(steps) == 7  # 24 examples, 12 in D1, batch 4: 3 steps x 2 epochs, + step 0
    assert all(sorted(r["layer"] for r in rows if r["step"] == s) == [0, 1, 2, 3] for s in steps)
    assert [r["alpha"] for r in rows if r["step"] == 0] == [0.5] * 4  # gate_init 0: alpha = sigmoid(0) before any step
    assert all(abs(r["alpha"] - 0.5) > 1e-4 for r in rows if r["step"] == steps[-1])  # every gate moved
    mask = read_mask(run / "layer_mask.json", backbone=str(tiny_bert), num_layers=4)
    final = _final_alphas(run)
    assert mask.scores == pytest.approx([final[i] for i in range(4)], abs=1e-6)
    assert mask.k == 2 and sorted(mask.selected_layers) == sorted(sorted(range(4), key=lambda i: -final[i])[:2])
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) >= {"task", "metric", "dev", "test", "trainable_params", "search_seconds", "retrain_seconds"}
    assert metrics["metric"] == "accuracy" and metrics["test"]["n"] == 8
    assert round(metrics["test"]["accuracy"] * 8, 6).is_integer()  # a share of the 8 test sentences
    assert metrics["trainable_params"] == mask.trainable_params

    assert main(["select", str(run), "--k", "2"]) == 0
    again = read_mask(run / "layer_mask.k2.json")
    assert again.selected_layers == mask.selected_layers and again.scores == mask.scores
    assert main(["select", str(run), "--k", "2"]) == 2  # no silent overwrite
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["select", str(run), "--k", "9"]) == 2
    assert "select.k: K=9 is larger than the 4 candidate layers" in capsys.readouterr().err


def test_budget_selection_and_ties_toward_lower_layers():
    common = dict(backbone="b", num_layers=4, candidates=[0, 1, 2, 3], k=None, per_generator=100, head_params=10,
                  prompt_length=3, task="t", seed=1)
    def ranked(scores):
        return Ranking.by_score("gates", [0, 1, 2, 3], scores, [0.0] * 4)

    mask = select_layers(ranking=ranked([0.5, 0.7, 0.5, 0.1]), budget=250, **common)
    assert mask.selected_layers == [0, 1] and mask.trainable_params == 210 and mask.param_budget == 250
    from spt.errors import UserError

    with pytest.raises(UserError, match="select.budget: a budget of 50 parameters fits no layer; one generator needs 100"):
        select_layers(ranking=ranked([0.5] * 4), budget=50, **common)


def test_rerunning_a_finished_run_needs_force(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1}, retrain={"epochs": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    before = (run / "gates.csv").read_text()
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 2
    assert "already holds this finished run; pass --force" in capsys.readouterr().err
    assert main(["search", str(config), "--out", str(run), "--quiet", "--set", "seed=3"]) == 2
    assert "holds a run with a different config (seed differs)" in capsys.readouterr().err
    assert (run / "gates.csv").read_text() == before
    assert main(["search", str(config), "--out", str(run), "--quiet", "--set", "seed=3", "--force"]) == 0
    assert (run / "gates.csv").read_text() != before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["search", str(config), "--out", str(tmp_path / "other"), "--quiet", "--force"]) == 2
    assert "is not an spt run directory" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_retrain_refuses_bad_masks(tmp_path, tiny_bert, tiny_models, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    good = json.loads((run / "layer_mask.json").read_text())

    def attempt(data, name):
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        code = main(["retrain", str(config), "--mask", str(path), "--out", str(tmp_path / f"re-{name}"), "--quiet"])
        assert (tmp_path / f"re-{name}").exists() == (code == 0)  # a refused mask leaves nothing behind
        return code, capsys.readouterr().err

    code, err = attempt({**good, "backbone": "mpnet-base"}, "other-backbone.json")
    assert code == 2 and "made for backbone 'mpnet-base'" in err
    code, err = attempt({**good, "backbone": str(tiny_bert)}, "ok.json")  # sanity: accepted as is
    assert code == 0, err
    code, err = attempt({**good, "num_layers": 12, "mask": good["mask"] + [0] * 8}, "layers.json")
    assert code == 2 and "made for 12 layers, but the backbone has 4" in err
    code, err = attempt('{"format": "spt-layer-mask", ', "broken.json")
    assert code == 2 and "not valid JSON" in err
    code, err = attempt({**good, "mask": [1, 1, 1, 1]}, "disagree.json")
    assert code == 2 and "mask and selected_layers disagree" in err


def test_select_by_dev_passes_shows_progress_and_a_summary_that_explains_the_pick(tmp_path, tiny_bert):
    """``spt select --method greedy|perturbation`` with output redirected: a line per 10% of
    its dev passes, then one summary line; greedy stops once K layers are chosen."""
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    for method, k, passes in (("greedy", 1, 1 + 4), ("greedy", 2, 1 + 4 + 3), ("perturbation", 2, 1 + 4)):
        done = subprocess.run(spt_command("select", run, "--k", k, "--method", method, "--force"), env=spt_env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        log = (done.stdout + done.stderr).splitlines()
        progress = [line for line in log if line.startswith(f"select ({method}) ")]
        assert progress[-1].startswith(f"select ({method}) 100% ({passes}/{passes} dev passes")
        summary = [line for line in log if line.startswith(f"select ({method}): layers")]
        assert len(summary) == 1 and f"({passes} dev passes over 8 examples" in summary[0]
        mask = read_mask(run / f"layer_mask.k{k}.{method}.json")
        if method == "greedy":  # the summary's path of losses names the chosen layers in the order chosen
            chosen = [int(part.split()[0]) for part in summary[0].split(" -> +")[1:]]
            assert sorted(chosen) == mask.selected_layers and "with no prompt" in summary[0]
        else:
            assert "removing a layer's prompt changes it by" in summary[0]
    quiet = subprocess.run(spt_command("select", run, "--k", "1", "--method", "greedy", "--force", "--quiet"),
                           env=spt_env(), capture_output=True, text=True)
    assert quiet.returncode == 0 and "select (greedy)" not in quiet.stdout + quiet.stderr


def test_a_selection_method_is_one_class_in_the_registry(tmp_path, tiny_bert, monkeypatch):
    """Registering a ranker makes it a ``select.method`` the config accepts, a ``--method``
    choice of ``spt select`` and a method the pipeline runs; the docs list every registered one."""
    import inspect

    from search.config import SelectConfig
    from search.rankers import RANKERS, Ranker
    from search.selection import Ranking

    for name in RANKERS:  # documented where users read the choices
        assert f"``{name}``" in inspect.getdoc(SelectConfig) and f"* `{name}`" in (REPO / "docs" / "method.md").read_text()

    class DeepestFirst(Ranker):
        name = "deepest"

        def rank(self, evidence):
            depth = [float(c) for c in evidence.candidates]
            return Ranking.by_score(self.name, evidence.candidates, depth, [0.0] * len(depth))

    monkeypatch.setitem(RANKERS, "deepest", DeepestFirst)
    assert SelectConfig(method="deepest").method == "deepest"
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    assert main(["select", str(run), "--k", "2", "--method", "deepest", "--quiet"]) == 0
    mask = read_mask(run / "layer_mask.k2.deepest.json")
    assert mask.method == "deepest" and mask.selected_layers == [2, 3]
    monkeypatch.delitem(RANKERS, "deepest")
    with pytest.raises(SystemExit):  # gone from the registry: no longer a choice
        main(["select", str(run), "--k", "2", "--method", "deepest"])


def test_kill_and_resume_reaches_the_same_gates(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, n_train=160, search={"epochs": 3, "checkpoint_every": 3})
    command = spt_command("search", config, "--quiet")

    reference = tmp_path / "reference"
    subprocess.run([*command, "--out", str(reference)], check=True, env=spt_env(), capture_output=True)

    interrupted = tmp_path / "interrupted"
    kill_during_search([*command, "--out", str(interrupted)], interrupted, past_step=24)  # of 60

    resumed = subprocess.run([*command, "--out", str(interrupted)], env=spt_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the search from step" in (interrupted / "log.txt").read_text()
    assert_same_gates(reference, interrupted)


def test_bf16_autocast_run(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1}, runtime={"precision": "bf16", "progress": False})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(_gate_rows(run)) == 4 * 4 and round(metrics["test"]["accuracy"] * 8, 6).is_integer()
    from spt import SparsePromptModel

    model = SparsePromptModel.from_pretrained(run / "sparse")  # saved from a bf16 run: trained weights stay fp32
    assert {p.dtype for p in model.generators.parameters()} == {torch.float32}


def test_mlm_verbalizer_run_end_to_end(tmp_path, tiny_models):
    head = {"type": "mlm", "template": "{text_a} it was {mask} .", "label_words": {"0": "bad", "1": "good"}}
    config = tiny_config(tmp_path, tiny_models["roberta"], head=head, search={"epochs": 1})
    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    mask = read_mask(run / "layer_mask.json")
    assert metrics["trainable_params"] == mask.trainable_params  # generators only: the MLM head is frozen
    per_generator = (8 + 32 * 8 // 2 + 8) + (8 + 8 * 32 // 2 + 32)
    assert mask.trainable_params == 2 * per_generator
