"""Strategies and ``spt compare`` on a tiny model: masks, compute, tables, refusals, resume."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import tiny_config

from search.cli import main
from search.config import load_config
from search.pipeline import prepare
from search.selection import read_mask
from search.strategies import STRATEGIES, Context

FAST = {"compare": {"random_draws": 2, "optuna_trials": 5, "trial_epochs": 1}, "search": {"epochs": 1}}


@pytest.fixture
def prep(tmp_path, tiny_bert):
    return prepare(load_config(tiny_config(tmp_path, tiny_bert, **FAST)))


def test_fixed_and_random_strategies_pick_the_documented_layers(prep, tmp_path):
    ctx = Context(k=2, workdir=tmp_path)
    assert STRATEGIES["first"].propose(prep, ctx)[0].mask.selected_layers == [0]
    assert STRATEGIES["all"].propose(prep, ctx)[0].mask.selected_layers == [0, 1, 2, 3]
    assert STRATEGIES["middle"].propose(prep, ctx)[0].mask.selected_layers == [2]
    draws = STRATEGIES["random"].propose(prep, ctx)
    assert [p.label for p in draws] == ["draw0", "draw1"] and all(len(p.mask.selected_layers) == 2 for p in draws)
    assert [p.mask.selected_layers for p in draws] == [p.mask.selected_layers for p in STRATEGIES["random"].propose(prep, ctx)]


def test_exhaustive_trains_every_subset_and_picks_the_best_dev(prep, tmp_path):
    proposal = STRATEGIES["exhaustive"].propose(prep, Context(k=2, workdir=tmp_path))[0]
    trials = proposal.details["trials"]
    assert sorted(tuple(t["layers"]) for t in trials) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    best = max(trials, key=lambda t: t["dev"])
    assert proposal.mask.selected_layers == best["layers"]
    assert proposal.compute.steps == sum(t["steps"] for t in trials) > 0


def test_optuna_strategy_scores_each_subset_once(prep, tmp_path):
    proposal = STRATEGIES["optuna"].propose(prep, Context(k=2, workdir=tmp_path))[0]
    layers = [tuple(t["layers"]) for t in proposal.details["trials"]]
    assert len(layers) == len(set(layers)) >= 1
    assert len(proposal.mask.selected_layers) == 2 and proposal.compute.steps > 0


def test_peft_baselines_train_only_their_own_parameters(prep, tmp_path):
    ctx = Context(k=2, workdir=tmp_path)
    for name in ("peft-prompt", "peft-prefix", "peft-ptuning", "peft-lora"):
        model = STRATEGIES[name].build_model(prep, ctx)
        trainable = model.trainable_parameters()
        assert all(("lora_" in n or "prompt_encoder" in n or n.startswith("head.")) for n in trainable), name
        batch = __import__("spt.inputs", fromlist=["collate"]).collate(prep.train, [0, 1])
        assert model(batch).logits.shape == (2, 2)
    finetune = STRATEGIES["finetune"].build_model(prep, ctx)
    assert finetune.num_trainable_parameters() > 10 * STRATEGIES["peft-lora"].build_model(prep, ctx).num_trainable_parameters()


def test_peft_prefix_is_refused_on_mpnet(tmp_path, tiny_models, capsys):
    config = tiny_config(tmp_path, tiny_models["mpnet"], **FAST)
    code = main(["compare", str(config), "--strategies", "first", "peft-prefix", "--out", str(tmp_path / "c"), "--quiet"])
    assert code == 2 and "PEFT prefix tuning cannot serve mpnet backbones" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "spt", "grid"], "unknown strategy 'grid'; choose from spt, first"),
        (["--k", "7"], "select.k: K=7 is larger than the 4 candidate layers"),
        (["--strategies", "exhaustive", "--set", "compare.exhaustive_limit=5"], "6 subsets of 2 among 4 layers exceed compare.exhaustive_limit=5"),
        (["--strategies", "optuna", "--set", "compare.optuna_sampler=grid"], "unknown sampler 'grid'"),
    ],
)
def test_compare_refuses_bad_input(tmp_path, tiny_bert, capsys, args, message):
    config = tiny_config(tmp_path, tiny_bert, **FAST)
    assert main(["compare", str(config), "--out", str(tmp_path / "c"), "--quiet", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_compare_writes_table_csv_plot_and_resumes(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, **FAST)
    out = tmp_path / "cmp"
    args = ["compare", str(config), "--strategies", "spt", "first", "random", "peft-lora", "--seeds", "1", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    with open(out / "compare.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["strategy"], r["seed"], r["draw"]) for r in rows] == [
        ("spt", "1", ""), ("first", "1", ""), ("random", "1", "draw0"), ("random", "1", "draw1"), ("peft-lora", "1", ""),
        ("spt", "2", ""), ("first", "2", ""), ("random", "2", "draw0"), ("random", "2", "draw1"), ("peft-lora", "2", ""),
    ]
    spt_rows = [r for r in rows if r["strategy"] == "spt"]
    assert all(int(r["search_steps"]) > 0 and float(r["search_seconds"]) > 0 for r in spt_rows)
    assert read_mask(out / "masks" / "spt-seed1.json").k == 2
    table = (out / "compare.md").read_text()
    assert "| spt | 2 |" in table and "| random | 4 |" in table and "| peft-lora | 2 |" in table
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(args) == 2 and "already holds this finished run" in capsys.readouterr().err

    # Resume: drop the last rows and the finished mark; the rerun redoes only those.
    with open(out / "compare.csv") as handle:
        lines = handle.readlines()
    (out / "compare.csv").write_text("".join(lines[:-3]))
    (out / "status.json").unlink()
    first_spt = json.loads((out / "masks" / "spt-seed1.json").read_text())
    assert main(args) == 0
    with open(out / "compare.csv") as handle:
        again = list(csv.DictReader(handle))
    assert [(r["strategy"], r["seed"], r["draw"]) for r in again] == [(r["strategy"], r["seed"], r["draw"]) for r in rows]
    assert again[0] == rows[0] and json.loads((out / "masks" / "spt-seed1.json").read_text()) == first_spt


def test_front_retrains_the_pick_for_every_k_from_one_search_and_resumes(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, **FAST)
    out = tmp_path / "front"
    assert main(["front", str(config), "--out", str(out), "--ks", "1", "3", "--quiet"]) == 0
    rows = [line.split(",") for line in (out / "front.csv").read_text().splitlines()]
    assert rows[0][:4] == ["k", "layers", "method", "trainable_params"] and [r[0] for r in rows[1:]] == ["1", "3"]
    mask_gates = json.loads((out / "layer_mask.json").read_text()) if (out / "layer_mask.json").exists() else None
    assert mask_gates is None  # the front writes its own table, not a single mask
    sizes = [int(r[3]) for r in rows[1:]]
    assert sizes[1] > sizes[0] and (out / "front.png").is_file() and (out / "front.md").is_file()
    searched = (out / "gates.csv").read_text()
    assert main(["front", str(config), "--out", str(out), "--ks", "1", "2", "3", "--quiet"]) == 2  # a finished front
    assert main(["front", str(config), "--out", str(out), "--ks", "9", "--quiet", "--force"]) == 2
    assert "--ks: K must be in 1..4" in capsys.readouterr().err
    assert (out / "gates.csv").read_text() == searched  # nothing redone or removed by the refusals
