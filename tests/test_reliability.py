"""Fault injection: kills at random steps, garbled artifacts, concurrent writers, read-only
destinations, bad bytes, ``--force`` next to a user's files, secrets, dead HPO workers.

Every refusal is one ``error: <field>: ...`` line, exit status 2, and leaves every file as
it was (nothing half-written, nothing overwritten).
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_gates, kill_during_search, refused, snapshot, spt_command, spt_env, tiny_config

from search.callbacks import Checkpointer
from search.cli import main
from spt.errors import UserError

SECRET = "s3cr3t-pw"
IS_ROOT = os.geteuid() == 0


def _no_constant(name: str) -> None:
    raise AssertionError(f"a JSON file holds {name}")


def flip_tensor_bytes(path: Path, count: int = 16, seed: int = 0) -> None:
    """Overwrite random bytes of a safetensors file's tensor data (its header stays valid)."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(seed)
    for offset in rng.sample(range(start, len(raw)), count):
        raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def searched(tmp_path, tiny_bert):
    """A config and a finished 1-epoch search directory."""
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    return config, run


@pytest.fixture
def interrupted(tmp_path, tiny_bert, monkeypatch, capsys):
    """A config and a search interrupted (Ctrl-C) after its checkpoint at step 4 of 6."""
    config = tiny_config(tmp_path, tiny_bert)
    run = tmp_path / "run"
    original = Checkpointer.on_step_end

    def save_then_interrupt(self, trainer, state, step, stats):
        original(self, trainer, state, step, stats)
        if state.step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Checkpointer, "on_step_end", save_then_interrupt)
        assert main(["search", str(config), "--out", str(run), "--quiet"]) == 130
    assert "resume the search from its last checkpoint" in capsys.readouterr().err
    assert (run / "checkpoint.safetensors").is_file() and not (run / "status.json").exists()
    return config, run


# ------------------------------------------------------------------ kills, locks, resume


def test_kills_at_random_steps_resume_to_the_same_gates_and_a_second_writer_is_refused(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, n_train=200, search={"epochs": 3, "checkpoint_every": 3})  # 75 steps
    reference = tmp_path / "reference"
    assert main(["search", str(config), "--out", str(reference), "--quiet"]) == 0
    run = tmp_path / "killed"
    command = spt_command("search", config, "--quiet", "--out", run)
    rng = random.Random(os.getpid())
    first, second = rng.randint(4, 20), rng.randint(32, 50)

    def second_writer(proc: subprocess.Popen) -> None:
        refused(capsys, ["search", str(config), "--out", str(run), "--quiet"], f"is in use by another spt job (pid {proc.pid} on")
        assert f'"pid": {proc.pid},' in (run / ".spt-lock").read_text()  # the holder keeps its lock

    kill_during_search(command, run, past_step=first, while_running=second_writer)
    kill_during_search(command, run, past_step=second)  # resumed, killed again
    assert main(["search", str(config), "--out", str(run), "--quiet"]) == 0
    assert "taking over the stale lock" in capsys.readouterr().err
    assert (run / "log.txt").read_text().count("resuming the search from step") == 2
    assert_same_gates(reference, run)
    assert not (run / ".spt-lock").exists()


def test_garbled_checkpoint_is_refused_naming_the_file_and_nothing_is_written(interrupted, capsys):
    config, run = interrupted
    flip_tensor_bytes(run / "checkpoint.safetensors")
    before = snapshot(run)
    line = refused(capsys, ["search", str(config), "--out", str(run), "--quiet"], "error: checkpoint: ")
    assert "checkpoint.safetensors is damaged: tensor" in line and "does not match its checksum" in line
    assert "delete checkpoint.safetensors to restart" in line
    assert snapshot(run) == before  # no gate row, no mask, no status


def test_a_gate_history_that_vanished_stops_the_search(interrupted, tmp_path, tiny_bert, monkeypatch, capsys):
    config, run = interrupted
    (run / "gates.csv").unlink()
    refused(capsys, ["search", str(config), "--out", str(run), "--quiet"], "gates.csv: ")
    assert not (run / "gates.csv").exists()  # not recreated with a hole in it

    other = tmp_path / "deleted-mid-run"
    original = Checkpointer.on_step_end

    def delete_history(self, trainer, state, step, stats):
        original(self, trainer, state, step, stats)
        if state.step == 2:
            (other / "gates.csv").unlink()

    monkeypatch.setattr(Checkpointer, "on_step_end", delete_history)
    line = refused(capsys, ["search", str(config), "--out", str(other), "--quiet"], "gates.csv: ")
    assert "was deleted while the search ran (before step 3)" in line and not (other / "gates.csv").exists()


def test_training_that_diverges_stops_with_exit_2_naming_the_step(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1, "lr": 1e30, "arch_lr": 1e30, "grad_clip": 0})
    run = tmp_path / "run"
    line = refused(capsys, ["run", str(config), "--out", str(run), "--quiet"], "error: search: training diverged at step ")
    assert "NaN or infinite" in line and "lower search.lr or search.arch_lr" in line
    assert not (run / "status.json").exists() and not (run / "layer_mask.json").exists()
    for path in run.rglob("*.json"):  # valid JSON: no NaN or Infinity anywhere
        json.loads(path.read_text(), parse_constant=_no_constant)
    assert "nan" not in (run / "gates.csv").read_text()


# ------------------------------------------------------------------ garbled run files


def _garble_gates_row(run: Path) -> None:
    lines = (run / "gates.csv").read_text().splitlines()
    lines[3] = "3,0,x,0.5"
    (run / "gates.csv").write_text("\n".join(lines) + "\n")


def _garble(path: str, text: str | bytes):
    def garble(run: Path) -> None:
        target = run / path
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    return garble


@pytest.mark.parametrize("garble, command, fragment", [
    (_garble("status.json", '{"search": '), ["run"], "status.json: is damaged (not valid JSON"),
    (_garble("status.json", b'{"search": "\xff"}'), ["run"], "status.json line 1: byte 0xff is not UTF-8 text"),
    (_garble(".spt-manifest.json", '{"format": "spt-run-manifest", "entries": ["../x"]}'), ["run"], ".spt-manifest.json is damaged"),
    (_garble("config.yaml", "seed: [1,\n"), ["select", "--k", "1"], "config.yaml: is damaged (not valid YAML"),
    (_garble("config.yaml", "seed: 1\nsearch: {lr: fast}\n"), ["select", "--k", "1"], "config.yaml: search.lr: expected a number"),
    (_garble_gates_row, ["select", "--k", "1"], "gates.csv line 4: not a valid gate row"),
    (_garble("gates.csv", "step,epoch,layer,alpha\n0,0,0,nan\n"), ["select", "--k", "1"], "gates.csv line 2: not a valid gate row"),
    (lambda run: flip_tensor_bytes(run / "supernet" / "prompt_weights.safetensors"),
     ["select", "--k", "1", "--method", "perturbation"], "error: model weights: "),
], ids=["status-json", "status-bytes", "manifest", "config-yaml", "config-field", "gates-row", "gates-nan", "prompt-weights"])
def test_garbled_run_files_exit_2_with_one_line_and_nothing_written(searched, capsys, garble, command, fragment):
    config, run = searched
    garble(run)
    before = snapshot(run)
    args = [command[0], str(config), "--out", str(run), "--quiet"] if command[0] == "run" else [command[0], str(run), *command[1:]]
    refused(capsys, args, fragment)
    assert snapshot(run) == before


@pytest.mark.parametrize("field, value, fragment", [
    ("candidate_layers", "abc", "field candidate_layers: expected a list of integers, got 'abc'"),
    ("scores", ["high", "low", "x", "y"], "field scores: expected a list of numbers"),
    ("k", [2], "field k: expected an integer, got [2]"),
    ("candidate_layers", [0, 1, 2, 9], "field candidate_layers must be distinct layers in 0..3"),
])
def test_masks_with_wrongly_typed_fields_are_refused(searched, tmp_path, capsys, field, value, fragment):
    config, run = searched
    mask = json.loads((run / "layer_mask.json").read_text())
    path = tmp_path / "bad-mask.json"
    path.write_text(json.dumps({**mask, field: value}))
    refused(capsys, ["retrain", str(config), "--mask", str(path), "--out", str(tmp_path / "re"), "--quiet"], fragment)
    assert not (tmp_path / "re").exists()


# ------------------------------------------------------------------ destinations


def _read_only_target(tmp_path: Path, how: str) -> Path:
    if how == "under-a-file":
        (tmp_path / "blocker").write_text("a file, not a folder")
        return tmp_path / "blocker" / "out"
    if IS_ROOT:
        pytest.skip("running as root: chmod does not stop root from writing (the under-a-file case covers root)")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
@pytest.mark.parametrize("command", ["run", "search", "retrain", "select", "plot", "hpo"])
def test_unwritable_destinations_are_refused_before_anything_is_written(searched, tmp_path, capsys, command, how):
    config, run = searched
    out = _read_only_target(tmp_path, how)
    db = tmp_path / "study.db"
    args = {
        "run": ["run", str(config), "--out", str(out)],
        "search": ["search", str(config), "--out", str(out)],
        "retrain": ["retrain", str(config), "--mask", str(run / "layer_mask.json"), "--out", str(out)],
        "select": ["select", str(run), "--k", "1", "--out", str(out.with_suffix(".json"))],
        "plot": ["plot", str(run), "--out", str(out.with_suffix(".png"))],
        "hpo": ["hpo", str(config), "--trials", "1", "--storage", f"sqlite:///{db}", "--out", str(out)],
    }[command]
    before = snapshot(tmp_path)
    line = refused(capsys, args, "--out: ")
    assert "is a file, not a folder" in line or "read-only or no permission" in line
    assert snapshot(tmp_path) == before and not db.exists()  # hpo: no study created


def test_force_never_deletes_a_users_files(searched, tmp_path, capsys):
    config, run = searched
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text((run / "config.yaml").read_text())
    (folder / "notes.txt").write_text("my notes")
    refused(capsys, ["search", str(config), "--out", str(folder), "--force", "--quiet"], "is not an spt run directory with a manifest")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]

    (run / "notes.txt").write_text("my notes")
    (run / "mine").mkdir()
    (run / "mine" / "data.csv").write_text("1,2\n")
    before = (run / "gates.csv").read_text()
    assert main(["search", str(config), "--out", str(run), "--force", "--quiet", "--set", "seed=3"]) == 0
    assert (run / "notes.txt").read_text() == "my notes" and (run / "mine" / "data.csv").read_text() == "1,2\n"
    assert (run / "gates.csv").read_text() != before
    listed = json.loads((run / ".spt-manifest.json").read_text())["entries"]
    assert "gates.csv" in listed and "supernet" in listed and "notes.txt" not in listed and "mine" not in listed


# ------------------------------------------------------------------ bad bytes and wrongly accepted input


def test_bad_bytes_long_fields_and_nested_values_in_data(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert)
    data = tmp_path / "data"
    out = tmp_path / "run"
    (data / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\xfe\t0\n")
    refused(capsys, ["run", str(config), "--out", str(out), "--quiet"],
            "task.train: " + str(data / "train.tsv") + " line 3: byte 0xff is not UTF-8 text; save the file as UTF-8")

    (data / "train.tsv").write_text("sentence\tlabel\n" + "long " * 30_000 + "\t1\n" + "short\t0\n")  # a 150,000-character field
    from search.config import load_config
    from search.data import read_split

    examples = read_split(load_config(config).task, "train")
    assert len(examples[0].text_a) == 150_000 and examples[1].text_a == "short"

    bad_config = tmp_path / "latin1.yaml"
    bad_config.write_bytes(config.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    refused(capsys, ["run", str(bad_config), "--out", str(out), "--quiet"], "is not UTF-8 text")

    (data / "train.jsonl").write_text('{"sentence": "fine", "label": "1"}\n{"sentence": ["a", "list"], "label": "0"}\n')
    refused(capsys, ["run", str(config), "--out", str(out), "--quiet", "--set", "task.format=jsonl", "--set", "task.train=" + str(data / "train.jsonl")],
            "train.jsonl line 2: field 'sentence' for task.text_a holds a JSON list")
    assert not out.exists()


def test_wrongly_accepted_input_is_refused(searched, tmp_path, capsys):
    config, run = searched
    for k in ("0", "-1"):  # argparse's own refusal (usage + one error line, exit 2)
        with pytest.raises(SystemExit) as exit_info:
            main(["select", str(run), "--k", k])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"spt select: error: argument --k: must be a whole number of at least 1, got {k}"
    labels = tmp_path / "labels.yaml"
    data = yaml.safe_load(config.read_text())
    data["task"]["labels"] = "ab"
    labels.write_text(yaml.safe_dump(data))
    refused(capsys, ["run", str(labels), "--out", str(tmp_path / "x"), "--quiet"], "task.labels: expected a list of strings, got 'ab'")
    before = snapshot(run)
    refused(capsys, ["retrain", str(config), "--mask", str(run / "layer_mask.json"), "--out", str(run), "--quiet"],
            "holds another job's results (stage search)")
    assert snapshot(run) == before


# ------------------------------------------------------------------ secrets and private paths


def test_storage_passwords_never_reach_files_or_messages(tmp_path, tiny_bert, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    url = f"postgresql://spt:{SECRET}@127.0.0.1:9/db"
    run = tmp_path / "run"
    argv = ["spt", "run", str(config), "--out", str(run), "--quiet", "--set", f"hpo.storage={url}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(argv[1:]) == 0
    for name, content in snapshot(run).items():
        assert SECRET.encode() not in content, name
    assert "postgresql://spt:***@127.0.0.1:9/db" in (run / "config.yaml").read_text()
    command = json.loads((run / "environment.json").read_text())["command"]
    assert "spt:***@" in command and str(tmp_path) not in command and "~/run" in command  # no home layout either

    err = refused(capsys, ["hpo", str(config), "--trials", "1", "--storage", url, "--out", str(tmp_path / "h")], "--storage: cannot open")
    assert SECRET not in err and "spt:***@" in err


def test_storage_password_from_the_environment(monkeypatch):
    from search.storage import mask_secrets, resolve_url

    monkeypatch.setenv("MY_DB_PASSWORD", "p@ss/word")
    assert resolve_url("postgresql://spt:${MY_DB_PASSWORD}@db/x") == "postgresql://spt:p%40ss%2Fword@db/x"  # encoded
    monkeypatch.setenv("SPT_STORAGE_PASSWORD", "p@ss")
    assert resolve_url("postgresql://spt@db/x") == "postgresql://spt:p%40ss@db/x"
    assert resolve_url("postgresql://spt:***@db/x") == "postgresql://spt:p%40ss@db/x"  # an exported config's URL
    assert resolve_url("sqlite:///a.db") == "sqlite:///a.db"
    assert mask_secrets("--storage postgresql+psycopg://u:pw@h:5432/db") == "--storage postgresql+psycopg://u:***@h:5432/db"
    monkeypatch.delenv("SPT_STORAGE_PASSWORD")
    from spt.errors import UserError

    with pytest.raises(UserError, match=r"--storage: the URL's password is masked \(\*\*\*\); set SPT_STORAGE_PASSWORD"):
        resolve_url("postgresql://spt:***@db/x")


def test_hpo_on_postgresql_keeps_the_password_out_of_trials_exports_and_messages(tmp_path, tiny_bert, postgres_url, capsys):
    if re.search(r"://[^/@]*:[^/@]*@", postgres_url):
        pytest.skip("the test server's URL already has a password")
    url = postgres_url.replace("://postgres@", f"://postgres:{SECRET}@")  # trust authentication accepts it
    space = {"hpo": {"space": {"select.k": [1, 2]}}, "search": {"epochs": 1}}
    config = tiny_config(tmp_path, tiny_bert, **space)
    out, best = tmp_path / "trials", tmp_path / "best.yaml"
    study = f"secret-{os.getpid()}-{time.time_ns()}"
    assert main(["hpo", str(config), "--trials", "1", "--storage", url, "--study", study, "--out", str(out),
                 "--export-best", str(best), "--quiet"]) == 0
    streams = capsys.readouterr()
    assert SECRET not in streams.out + streams.err
    for name, content in {**snapshot(out), "best.yaml": best.read_bytes()}.items():
        assert SECRET.encode() not in content, name
    assert ":***@" in yaml.safe_load(best.read_text())["hpo"]["storage"]


# ------------------------------------------------------------------ dead HPO workers, default study file


def test_a_killed_hpo_worker_is_failed_and_its_trial_retried_from_its_checkpoint(tmp_path, tiny_bert, capsys):
    import optuna
    from optuna.trial import TrialState

    settings = {"hpo": {"space": {"select.k": [1, 2]}, "heartbeat_interval": 1, "grace_period": 2},
                "search": {"epochs": 2, "checkpoint_every": 3}}
    config = tiny_config(tmp_path, tiny_bert, n_train=160, **settings)
    out, db = tmp_path / "trials", f"sqlite:///{tmp_path / 'study.db'}"
    args = ["hpo", str(config), "--trials", "1", "--storage", db, "--study", "s", "--out", str(out)]
    kill_during_search(spt_command(*args, "--quiet"), out / "trial-0000", past_step=6)
    time.sleep(3)  # the grace period passes without a heartbeat
    assert main(args) == 0
    log = capsys.readouterr().err
    assert "trial 1 retries trial-0000 of dead worker" in log and "resuming the search from step" in log
    first, retry = optuna.load_study(study_name="s", storage=db).trials
    assert first.state == TrialState.FAIL and retry.state == TrialState.COMPLETE and retry.params == first.params
    assert retry.user_attrs["run_dir"] == "trial-0000" and sorted(p.name for p in out.iterdir()) == ["trial-0000"]


def test_ctrl_c_in_an_hpo_trial_says_what_happens_and_it_does(tmp_path, tiny_bert, monkeypatch, capsys):
    import optuna
    from optuna.trial import TrialState

    import search.hpo

    def interrupted_job(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.hpo, "run_job", interrupted_job)
    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"select.k": [1, 2]}})
    db = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["hpo", str(config), "--trials", "2", "--storage", db, "--study", "s", "--out", str(tmp_path / "t"), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == ("interrupted; the running trial is marked failed and is not resumed; "
                                               "run the same command again to continue the study with new trials")
    (trial,) = optuna.load_study(study_name="s", storage=db).trials
    assert trial.state == TrialState.FAIL and not (tmp_path / "t" / "trial-0000" / ".spt-lock").exists()


def test_a_running_trial_of_a_dead_local_worker_on_a_journal_is_failed_and_retried(tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    from search.hpo import fail_dead_local_trials

    study = optuna.create_study(storage=optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j.log"))))
    trial = study.ask()
    trial.suggest_int("select.k", 1, 3)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    alive = study.ask()
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    fail_dead_local_trials(study, max_retry=2)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert study.trials[2].params == study.trials[0].params


def test_the_default_study_file_goes_into_out_and_masks_compare_models_not_names(tmp_path, tiny_bert, monkeypatch):
    from search.selection import read_mask
    from spt.hub import same_model

    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"select.k": [1, 2]}})
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["hpo", str(config), "--trials", "0", "--out", str(tmp_path / "h"), "--quiet"]) == 0
    assert (tmp_path / "h" / "spt-hpo.db").is_file() and not list(work.iterdir())

    alias = tmp_path / "same-model"
    alias.symlink_to(tiny_bert)
    mask = {"format": "spt-layer-mask", "version": 2, "backbone": str(tiny_bert), "num_layers": 4, "candidate_layers": [0, 1, 2, 3],
            "selected_layers": [1], "mask": [0, 1, 0, 0], "scores": [0.1, 0.9, 0.2, 0.3], "k": 1, "param_budget": None,
            "trainable_params": 10, "prompt_length": 3, "task": "toy", "seed": 7}
    (tmp_path / "m.json").write_text(json.dumps(mask))
    assert read_mask(tmp_path / "m.json", backbone=str(alias) + "/").selected_layers == [1]
    try:
        from spt.hub import resolve_model_source

        folder = resolve_model_source("minilm-l6")
    except UserError as exc:  # the alias half needs the packaged MiniLM; say so instead of passing silently
        pytest.skip(f"MiniLM-L6 is not installed here ({exc}); the alias comparison needs it")
    assert same_model("minilm-l6", folder) and same_model("all-MiniLM-L6-v2", "minilm-l6")
    assert not same_model("minilm-l6", str(tiny_bert))


def test_a_subprocess_refusal_prints_one_line_and_no_traceback(tmp_path, tiny_bert):
    config = tiny_config(tmp_path, tiny_bert)
    (tmp_path / "blocker").write_text("x")
    result = subprocess.run(spt_command("search", config, "--out", tmp_path / "blocker" / "run", "--quiet"),
                            env=spt_env(), capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
