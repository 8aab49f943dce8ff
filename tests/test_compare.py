"""Strategies and ``spt compare`` on a tiny model: masks, compute, tables, refusals, resume."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
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


# ---------------------------------------------------------------- adapters, head-only, prompting

VERBALIZER = {"template": "{text_a} it was {mask} .", "label_words": {"0": "bad", "1": "good"}}


@pytest.fixture
def mlm_prep(tmp_path, tiny_models):
    return prepare(load_config(tiny_config(tmp_path, tiny_models["roberta"], head=VERBALIZER, **FAST)))


@pytest.mark.parametrize("kind,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapters_start_as_the_frozen_model_and_match_the_generator_budget(mlm_prep, tmp_path, kind, per_layer):
    from search.selection import generator_parameters
    from spt.adapters import adapter_parameters, adapter_size_for
    from spt.inputs import collate

    mlm_prep.config.compare.adapter_kind = kind
    model = STRATEGIES["adapter"].build_model(mlm_prep, Context(k=2, workdir=tmp_path))
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in model.trainable_parameters()} <= {"encoder.adapters", "head.classifier"}
    d, L = 32, 4
    size = adapter_size_for(2 * generator_parameters(d, 8, 2), d, L, kind)
    assert len(model.encoder.adapters) == per_layer * L
    assert model.num_trainable_parameters() - (2 * d + 2) == per_layer * L * adapter_parameters(d, size)
    batch = collate(mlm_prep.train, [0, 1, 2])
    frozen = mlm_prep.backbone.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    adapted = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(adapted, frozen, atol=0, rtol=0)  # zero-initialised up projections: the identity
    with torch.no_grad():  # the last layer's feed-forward adapter now adds a (non-constant) vector
        model.encoder.adapters[-1].up.bias.copy_(torch.linspace(-1.0, 1.0, d))
    moved = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert not torch.allclose(moved, frozen, atol=1e-3)


def test_head_only_trains_the_classifier_on_the_unprompted_states(prep, tmp_path):
    from spt.inputs import collate
    from spt.model import unprompted_states

    model = STRATEGIES["head-only"].build_model(prep, Context(k=2, workdir=tmp_path))
    assert set(model.trainable_parameters()) == {"head.classifier.weight", "head.classifier.bias"}
    batch = collate(prep.train, [0, 1, 2])
    model.eval()
    with torch.no_grad():
        states = unprompted_states(prep.backbone, batch)
        torch.testing.assert_close(model(batch).logits, model.head.classifier(states[:, 0]))


def test_zero_shot_scores_label_words_with_the_mlm_head(mlm_prep):
    from transformers import AutoModelForMaskedLM

    from search import prompting
    from spt.inputs import collate

    scored, model = prompting.prompted(mlm_prep, "zero-shot")
    assert model.num_trainable_parameters() == 0 and scored.backbone.lm_head is not None
    tok = scored.backbone.tokenizer
    batch = collate(scored.dev, list(range(len(scored.dev))))
    reference = AutoModelForMaskedLM.from_pretrained(mlm_prep.config.model.backbone).eval()
    words = [tok.encode(" bad", add_special_tokens=False)[0], tok.encode(" good", add_special_tokens=False)[0]]
    with torch.no_grad():
        logits = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = model.eval()(batch).logits
    rows = torch.arange(len(scored.dev))
    torch.testing.assert_close(got, logits[rows, batch["mask_positions"]][:, words], atol=1e-5, rtol=0)


def test_in_context_prepends_seeded_answered_demonstrations(tmp_path, tiny_decoders):
    """On GPT-2 (whose test tokenizer spells the words out): the instruction, the answered
    demonstrations and the input's template up to {mask}, one per line; the same with the seed."""
    from search import prompting

    instruction = "is it good or bad ?"
    config = tiny_config(tmp_path, tiny_decoders["gpt2"], head={**VERBALIZER, "pooling": "auto"}, task={"instruction": instruction},
                         model={"max_length": 64}, **FAST)
    prep = prepare(load_config(config))
    scored, model = prompting.prompted(prep, "in-context", count=2)
    again, _ = prompting.prompted(prep, "in-context", count=2)
    shown = prompting.demonstrations(prep, scored.config.head, 2)
    assert scored.config.head.type == "clm" and model.head.kind == "clm"
    assert len(shown) == 2 and all(s.endswith(("it was bad .", "it was good .")) for s in shown)
    assert scored.dev.demonstrations == [2] * len(scored.dev)  # short sentences: both fit
    tok = scored.backbone.tokenizer
    expected = "\n".join([instruction, *shown, f"{prep.data.dev[0].text_a} it was"])
    assert tok.decode(scored.dev.input_ids[0]) == expected
    assert scored.dev.input_ids == again.dev.input_ids  # the seed fixes the demonstrations
    short = prompting.prompted(dataclasses.replace(prep, config=dataclasses.replace(
        prep.config, model=dataclasses.replace(prep.config.model, max_length=len(scored.dev.input_ids[0]) - 1))), "in-context", 2)[0]
    assert short.dev.demonstrations[0] == 1  # one demonstration less fits: the earliest is left out
    assert tok.decode(short.dev.input_ids[0]) == "\n".join([instruction, shown[1], f"{prep.data.dev[0].text_a} it was"])


def test_prompting_strategies_run_through_compare_without_training(tmp_path, tiny_models):
    config = tiny_config(tmp_path, tiny_models["roberta"], head=VERBALIZER, **FAST)
    out = tmp_path / "cmp"
    args = ["compare", str(config), "--strategies", "zero-shot", "in-context", "adapter", "head-only", "--out", str(out), "--quiet"]
    assert main(args) == 0
    with open(out / "compare.csv") as handle:
        rows = {r["strategy"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["zero-shot", "in-context", "adapter", "head-only"]
    for name in ("zero-shot", "in-context"):
        assert rows[name]["train_steps"] == "0" and rows[name]["trainable_params"] == "0" and rows[name]["layers"] == "-"
    assert rows["in-context"]["note"].endswith("of 4 demonstrations per input")
    assert int(rows["adapter"]["train_steps"]) > 0 and rows["head-only"]["trainable_params"] == "66"


def test_prompting_is_refused_without_an_lm_head_or_a_template(tmp_path, tiny_bert, capsys):
    from transformers import AutoModel, AutoTokenizer

    bare = tmp_path / "bare-bert"  # the encoder alone: no MLM head in the checkpoint
    AutoModel.from_pretrained(tiny_bert).save_pretrained(bare)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(bare)
    config = tiny_config(tmp_path, bare, head=VERBALIZER, **FAST)
    assert main(["compare", str(config), "--strategies", "first", "zero-shot", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: strategy zero-shot: scores label words with the backbone's language-model head, and" in err
    assert "has no trained one (" in err and "leave zero-shot out for this backbone" in err
    config = tiny_config(tmp_path, tiny_bert, **FAST)
    assert main(["compare", str(config), "--strategies", "in-context", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert "strategy in-context: needs head.template and head.label_words" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_every_strategy_is_documented_in_the_help_and_the_readme(capsys):
    from search.methods import STRATEGY_METHODS

    assert list(STRATEGIES) == list(STRATEGY_METHODS)
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = capsys.readouterr().out
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name, method in STRATEGY_METHODS.items():
        assert f"  {name}" in help_text and method in help_text, name
        assert f"| `{name}` |" in readme, name


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
