"""``spt hpo``: cooperating worker processes on PostgreSQL and on a journal file, resume,
export, and refusals that leave the study untouched."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import free_port, spt_command, spt_env, tiny_config

from search.cli import main

HPO = {"hpo": {"space": {"search.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "select.k": [1, 2]}}, "search": {"epochs": 1}}


def _two_workers(config: Path, storage: str, study: str, out: Path, trials: int = 2, extra: tuple[str, ...] = ()) -> None:
    command = spt_command("hpo", config, "--trials", trials, "--storage", storage, "--study", study, "--out", out, "--quiet", *extra)
    workers = [subprocess.Popen(command, env=spt_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for w in workers:
        stdout, stderr = w.communicate(timeout=600)
        assert w.returncode == 0, stderr


def _check_cooperation(storage_url: str, study: str, out: Path, expected: int) -> None:
    import optuna
    from optuna.trial import TrialState

    from search.hpo import open_storage

    trials = optuna.load_study(study_name=study, storage=open_storage(storage_url)).get_trials()
    assert len(trials) == expected
    assert sorted(t.number for t in trials) == list(range(expected))  # none lost, none duplicated
    assert all(t.state == TrialState.COMPLETE for t in trials)
    workers = [t.user_attrs["worker"] for t in trials]
    assert len(set(workers)) == 2 and all(workers.count(w) == expected // 2 for w in set(workers))
    dirs = [out / t.user_attrs["run_dir"] for t in trials]  # relative: the study keeps no user's folder layout
    assert len(set(dirs)) == expected and all((d / "metrics.json").is_file() for d in dirs)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("trial-")) == [f"trial-{i:04d}" for i in range(expected)]


def test_two_workers_share_a_postgresql_study(tmp_path, tiny_bert, postgres_url):
    config = tiny_config(tmp_path, tiny_bert, **HPO)
    study = f"pg-{os.getpid()}-{time.time_ns()}"
    _two_workers(config, postgres_url, study, tmp_path / "trials")
    _check_cooperation(postgres_url, study, tmp_path / "trials", expected=4)


def test_two_workers_share_a_multi_objective_postgresql_study(tmp_path, tiny_bert, postgres_url):
    """Accuracy against size on a shared storage: no trial lost or duplicated, every trial two values."""
    import optuna

    from search.hpo import open_storage

    config = tiny_config(tmp_path, tiny_bert, **HPO)
    study = f"mo-{os.getpid()}-{time.time_ns()}"
    _two_workers(config, postgres_url, study, tmp_path / "trials", extra=("--objectives", "dev", "params", "--mode", "subsets"))
    _check_cooperation(postgres_url, study, tmp_path / "trials", expected=4)
    loaded = optuna.load_study(study_name=study, storage=open_storage(postgres_url))
    assert len(loaded.directions) == 2 and all(len(t.values) == 2 for t in loaded.trials)


def test_two_workers_share_a_journal_file_and_a_rerun_continues(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, **HPO)
    storage = f"journal:{tmp_path / 'study.log'}"
    _two_workers(config, storage, "j", tmp_path / "trials")
    _check_cooperation(storage, "j", tmp_path / "trials", expected=4)
    import optuna

    from search.hpo import open_storage

    assert optuna.load_study(study_name="j", storage=open_storage(storage)).metric_names == ["dev accuracy"]
    best = tmp_path / "best.yaml"
    args = ["hpo", str(config), "--trials", "1", "--storage", storage, "--study", "j", "--out", str(tmp_path / "trials"), "--quiet"]
    assert main([*args, "--export-best", str(best)]) == 0
    assert "| 4 | COMPLETE |" in capsys.readouterr().out  # the study continued: a fifth trial
    from search.config import load_config

    exported = load_config(best)
    best_trial = optuna.load_study(study_name="j", storage=open_storage(storage)).best_trial
    assert exported.select.k == best_trial.params["select.k"]  # the best trial's own values, not just any in the space
    assert exported.search.lr == pytest.approx(best_trial.params["search.lr"], rel=1e-9)
    assert main(["run", str(best), "--out", str(tmp_path / "rerun"), "--quiet"]) == 0


def test_bad_storage_and_conflicting_study_are_refused_without_harm(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, **HPO)
    port = free_port()
    code = main(["hpo", str(config), "--trials", "1", "--storage", f"postgresql+psycopg2://nobody@127.0.0.1:{port}/x", "--quiet"])
    assert code == 2 and "--storage: cannot" in capsys.readouterr().err
    assert main(["hpo", str(config), "--trials", "1", "--storage", "nonsense", "--quiet"]) == 2
    assert "is not a storage URL" in capsys.readouterr().err

    db = f"sqlite:///{tmp_path / 'h.db'}"
    base = ["hpo", str(config), "--storage", db, "--study", "s", "--out", str(tmp_path / "t"), "--quiet"]
    assert main([*base, "--trials", "1"]) == 0
    capsys.readouterr()
    assert main([*base, "--trials", "1", "--set", "hpo.space={search.lr: [0.001, 0.002]}"]) == 2
    assert "study 's' exists with another search space" in capsys.readouterr().err
    assert main([*base, "--trials", "1", "--set", "prompt.length=4"]) == 2
    assert "exists for another base config" in capsys.readouterr().err
    import optuna

    study = optuna.load_study(study_name="s", storage=db)
    assert len(study.trials) == 1 and "search.lr" in study.user_attrs["spt_space"]


def test_an_impossible_combination_is_pruned_and_the_worker_goes_on(tmp_path, tiny_bert, capsys):
    """K above the candidate layers or phm_n not dividing the bottleneck: that trial is pruned, not the worker."""
    import optuna
    from optuna.trial import TrialState

    space = {"hpo": {"space": {"select.k": [9, 2], "prompt.phm_n": [3, 2]}, "sampler": "random"}, "search": {"epochs": 1}}
    config = tiny_config(tmp_path, tiny_bert, **space)
    db = f"sqlite:///{tmp_path / 'p.db'}"
    assert main(["hpo", str(config), "--trials", "6", "--storage", db, "--study", "p", "--out", str(tmp_path / "t"), "--quiet"]) == 0
    trials = optuna.load_study(study_name="p", storage=db).trials
    assert len(trials) == 6
    for t in trials:
        valid = t.params["select.k"] == 2 and t.params["prompt.phm_n"] == 2
        assert t.state == (TrialState.COMPLETE if valid else TrialState.PRUNED), (t.params, t.state)
        if not valid:
            assert t.user_attrs["invalid"].startswith(("select.k:", "prompt.phm_n:")), t.user_attrs


def test_a_multi_objective_study_over_layer_subsets_writes_its_pareto_front(tmp_path, tiny_bert, capsys):
    """``--objectives dev params --mode subsets``: trials retrain subsets they suggest; the front is
    the non-dominated trials; ``--max-params`` exports the best one that fits."""
    import optuna

    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"prompt.length": [2, 3]}, "sampler": "random"}, retrain={"epochs": 1})
    db = f"sqlite:///{tmp_path / 'mo.db'}"
    best = tmp_path / "best.yaml"
    out = tmp_path / "t"
    args = ["hpo", str(config), "--trials", "5", "--storage", db, "--study", "mo", "--out", str(out), "--quiet",
            "--objectives", "dev", "params", "--mode", "subsets"]
    assert main([*args, "--export-best", str(best), "--max-params", "1000"]) == 0
    study = optuna.load_study(study_name="mo", storage=db)
    trials = [t for t in study.trials if t.values]
    assert len(study.directions) == 2 and len(trials) == 5
    assert study.metric_names == ["dev accuracy", "trainable parameters"]  # what the dashboard labels its axes with
    for t in trials:  # the values are what each trial's run reports
        metrics = json.loads((out / t.user_attrs["run_dir"] / "metrics.json").read_text())
        assert t.values == [metrics["dev"]["accuracy"], metrics["trainable_params"]]
        assert not (out / t.user_attrs["run_dir"] / "gates.csv").exists()  # no search in this mode
    front = {t.number for t in study.best_trials}
    for t in trials:  # a trial is on the front iff no other is at least as good on both and better on one
        dominated = any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)
        assert (t.number in front) != dominated
    assert (out / "pareto.md").is_file() and (out / "pareto.png").is_file()
    exported = load_config_file(best)
    fits = [t for t in trials if t.values[1] <= 1000]
    chosen = max(fits, key=lambda t: (t.values[0], -t.number))
    assert exported.prompt.candidate_layers == chosen.user_attrs["selected_layers"]
    capsys.readouterr()
    assert main([*args[:2], "--trials", "0", *args[4:], "--export-best", str(best), "--force", "--max-params", "1"]) == 2
    assert "--max-params: no completed trial has at most 1 trainable parameters" in capsys.readouterr().err


def load_config_file(path):
    from search.config import load_config

    return load_config(path)
