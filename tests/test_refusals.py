"""Issue 29: secrets with reserved characters, bad numbers on the command line, a
``model.max_length`` the backbone cannot hold, damaged run folders in ``spt runs``,
leftovers and vague messages, wrong-length mask fields.

Every refusal is one ``error:`` line (argparse's own ``usage`` + ``error:`` for a bad
option value) with exit status 2, and leaves nothing behind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml
from helpers import refused, snapshot, tiny_config

from search.cli import main

MASK = "***"
PASSWORD = "p/ss@w:rd%2F"
SECRET_URL = f"postgresql://spt:{PASSWORD}@127.0.0.1:9/db"
MASKED_URL = "postgresql://spt:***@127.0.0.1:9/db"
LEAKS = (PASSWORD, quote(PASSWORD, safe=""), "p/ss", "ss@w", "w:rd", "rd%2F")


def assert_no_leak(files: dict[str, bytes]) -> None:
    for name, content in files.items():
        for leak in LEAKS:
            assert leak.encode() not in content, (name, leak)


# ------------------------------------------------------------------ 1. storage URL secrets


def test_a_password_with_slash_at_and_colon_stays_out_of_a_run_and_the_storage_error(tmp_path, tiny_bert, monkeypatch, capsys):
    config = tiny_config(tmp_path, tiny_bert, search={"epochs": 1})
    run = tmp_path / "run"
    argv = ["spt", "run", str(config), "--out", str(run), "--quiet", "--set", f"hpo.storage={SECRET_URL}"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main(argv[1:]) == 0
    capsys.readouterr()
    assert_no_leak(snapshot(run))
    assert yaml.safe_load((run / "config.yaml").read_text())["hpo"]["storage"] == MASKED_URL
    assert f"hpo.storage={MASKED_URL}" in json.loads((run / "environment.json").read_text())["command"]

    err = refused(capsys, ["hpo", str(config), "--trials", "1", "--storage", SECRET_URL, "--out", str(tmp_path / "h")],
                  f"--storage: cannot open '{MASKED_URL}' (")
    assert not any(leak in err for leak in LEAKS) and err.count(MASK) == 1, err
    assert not (tmp_path / "h").exists()


def test_the_driver_message_keeps_its_letters_when_the_password_is_one_of_them(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert)
    err = refused(capsys, ["hpo", str(config), "--trials", "1", "--storage", "postgresql://spt:p@127.0.0.1:9/db",
                           "--out", str(tmp_path / "h")], "--storage: cannot open 'postgresql://spt:***@127.0.0.1:9/db' (")
    assert err.count(MASK) == 1, err  # the URL's password only: "psycopg", "port" and "Operational" intact
    assert "spt:p@" not in err


def test_hpo_trials_and_the_exported_best_config_mask_a_password_with_reserved_characters(tmp_path, tiny_bert, monkeypatch, capsys):
    from search import hpo
    from search.storage import open_storage

    opened = []

    def sqlite_instead(url, *args):  # the study lives in SQLite; the config keeps the PostgreSQL URL
        opened.append(url)
        return open_storage(f"sqlite:///{tmp_path / 'study.db'}", *args)

    monkeypatch.setattr(hpo, "open_storage", sqlite_instead)
    config = tiny_config(tmp_path, tiny_bert, hpo={"space": {"select.k": [1, 2]}}, search={"epochs": 1})
    out, best = tmp_path / "trials", tmp_path / "best.yaml"
    argv = ["spt", "hpo", str(config), "--trials", "1", "--storage", SECRET_URL, "--study", "s", "--out", str(out),
            "--export-best", str(best), "--quiet"]
    monkeypatch.setattr(sys, "argv", argv)
    assert main(argv[1:]) == 0
    streams = capsys.readouterr()
    assert opened == [SECRET_URL] and not any(leak in streams.out + streams.err for leak in LEAKS)
    assert_no_leak({**snapshot(out), "best.yaml": best.read_bytes()})
    assert yaml.safe_load((out / "trial-0000" / "config.yaml").read_text())["hpo"]["storage"] == MASKED_URL
    assert f"--storage {MASKED_URL}" in json.loads((out / "trial-0000" / "environment.json").read_text())["command"]
    assert yaml.safe_load(best.read_text())["hpo"]["storage"] == MASKED_URL


def test_storage_urls_are_parsed_not_pattern_matched(monkeypatch):
    from sqlalchemy.engine import make_url

    from search.storage import mask_password, mask_secrets, mask_url, resolve_url, storage_file

    monkeypatch.delenv("SPT_STORAGE_PASSWORD", raising=False)
    assert make_url(resolve_url(SECRET_URL)).password == PASSWORD  # the database gets the password as written
    assert make_url(resolve_url(f"postgresql://spt:{quote(PASSWORD, safe='')}@h/db")).password == PASSWORD  # or encoded
    assert mask_url("postgresql://spt:p@ss@db/x") == "postgresql://spt:***@db/x"  # no tail of it left
    assert mask_secrets(f"spt hpo --storage {SECRET_URL} --out x") == f"spt hpo --storage {MASKED_URL} --out x"
    assert mask_password("(psycopg.OperationalError) port 9 failed for spt:p@h", "p") == "(psycopg.OperationalError) port 9 failed for spt:***@h"
    assert mask_password(f"bad password {quote(PASSWORD, safe='')}", PASSWORD) == "bad password ***"
    for url in ("sqlite:///a.db", "sqlite:////tmp/x@y:z/a.db", "journal:/tmp/a:b@c/study.log", "postgresql://spt@db/x"):
        assert mask_url(url) == url and resolve_url(url) == url
    assert storage_file(resolve_url("journal:/tmp/a:b@c/study.log")) == Path("/tmp/a:b@c/study.log")


# ------------------------------------------------------------------ 2. numbers on the command line

BAD_OPTIONS = [
    (["predict", "r", "--input", "x", "--batch-size", "0"], "--batch-size", "must be a whole number of at least 1, got 0"),
    (["predict", "r", "--input", "x", "--batch-size", "-1"], "--batch-size", "must be a whole number of at least 1, got -1"),
    (["evaluate", "r", "--batch-size", "two"], "--batch-size", "must be a whole number of at least 1, got 'two'"),
    (["select", "r", "--k", "0"], "--k", "must be a whole number of at least 1, got 0"),
    (["select", "r", "--budget", "-5"], "--budget", "must be a whole number of at least 1, got -5"),
    (["compare", "c", "--k", "0"], "--k", "must be a whole number of at least 1, got 0"),
    (["compare", "c", "--seeds", "1", "-1"], "--seeds", "must be a whole number in [0, 4294967295], got -1"),
    (["compare", "c", "--seeds", str(2**32)], "--seeds", f"must be a whole number in [0, 4294967295], got {2**32}"),
    (["front", "c", "--ks", "1", "0"], "--ks", "must be a whole number of at least 1, got 0"),
    (["hpo", "c", "--trials", "-1"], "--trials", "must be a whole number, 0 or more, got -1"),
    (["hpo", "c", "--trials", "1", "--max-trials", "0"], "--max-trials", "must be a whole number of at least 1, got 0"),
    (["hpo", "c", "--trials", "1", "--timeout", "nan"], "--timeout", "must be a finite number above 0, got nan"),
    (["hpo", "c", "--trials", "1", "--timeout", "inf"], "--timeout", "must be a finite number above 0, got inf"),
    (["hpo", "c", "--trials", "1", "--timeout", "0"], "--timeout", "must be a finite number above 0, got 0"),
    (["hpo", "c", "--trials", "1", "--max-params", "0"], "--max-params", "must be a whole number of at least 1, got 0"),
    (["plot", "r", "--size", "0", "3"], "--size", "must be in (0, 50] inches, got 0"),
    (["plot", "r", "--size", "2000", "2000"], "--size", "must be in (0, 50] inches, got 2000"),
    (["plot", "r", "--size", "nan", "3"], "--size", "must be in (0, 50] inches, got nan"),
    (["plot", "r", "--dpi", "5"], "--dpi", "must be in [10, 1200] dots per inch, got 5"),
    (["plot", "r", "--dpi", "inf"], "--dpi", "must be in [10, 1200] dots per inch, got inf"),
    (["plot", "r", "--font-size", "0"], "--font-size", "must be in (0, 72] points, got 0"),
    (["plot", "r", "--font-size", "100"], "--font-size", "must be in (0, 72] points, got 100"),
]


@pytest.mark.parametrize(("args", "option", "problem"), BAD_OPTIONS, ids=[f"{a[0]} {o} {a[-1]}" for a, o, _ in BAD_OPTIONS])
def test_a_number_out_of_range_is_refused_by_argparse_naming_the_option(args, option, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"usage: spt {args[0]} ")
    assert err[-1] == f"spt {args[0]}: error: argument {option}: {problem}"
    assert list(tmp_path.iterdir()) == []


def test_numbers_at_the_limits_parse():
    from search.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["plot", "r", "--size", "50", "0.5", "--dpi", "1200", "--font-size", "72"])
    assert (args.size, args.dpi, args.font_size) == ([50.0, 0.5], 1200.0, 72.0)
    args = parser.parse_args(["hpo", "c", "--trials", "0", "--max-trials", "1", "--timeout", "0.5", "--max-params", "1"])
    assert (args.trials, args.max_trials, args.timeout, args.max_params) == (0, 1, 0.5, 1)
    assert parser.parse_args(["compare", "c", "--seeds", "0", str(2**32 - 1)]).seeds == [0, 2**32 - 1]


def test_a_figure_of_too_many_pixels_is_refused_before_it_is_drawn(tmp_path, capsys):
    from analysis import style
    from search import options
    from spt.errors import UserError

    out = tmp_path / "figure.png"
    refused(capsys, ["plot", str(tmp_path / "no-run"), "--out", str(out), "--size", "50", "50", "--dpi", "300"],
            "--size: a 50 x 50 inch figure at 300 dpi is 225 megapixels, more than 100; give a smaller --size or --dpi")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match=r"^--dpi: a 10 x 10 inch figure at 1200 dpi is 144 megapixels"):
        style.new_figure(style.FigureStyle(dpi=1200), (10.0, 10.0))  # sized to its content
    with pytest.raises(UserError, match=r"^--dpi: must be in \[10, 1200\] dots per inch, got 5000"):
        style.FigureStyle(dpi=5000)  # the Python API has the command line's limits
    assert (options.MAX_INCHES, options.DPI_RANGE, options.MAX_FONT_POINTS) == (style.MAX_INCHES, style.DPI_RANGE, style.MAX_FONT_POINTS)


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_optuna_cannot_take_is_refused_in_the_config(seed, tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert)
    refused(capsys, ["run", str(config), "--out", str(tmp_path / "run"), "--set", f"seed={seed}"],
            f"seed: must be in [0, 4294967295] (NumPy's and Optuna's samplers take no other), got {seed}")
    refused(capsys, ["compare", str(config), "--out", str(tmp_path / "c"), "--set", f"compare.seeds=[1, {seed}]"],
            f"compare.seeds: must be whole numbers in [0, 4294967295], got [1, {seed}]")
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("section", ["search", "retrain"])
def test_an_epoch_count_no_run_could_plan_is_refused_before_the_run_folder_exists(section, tmp_path, tiny_bert, capsys):
    """(The fuzzer's 2**63 retrain.epochs ran the whole search, then an OverflowError or a
    MemoryError whose message blamed the batch size.)"""
    config = tiny_config(tmp_path, tiny_bert)
    refused(capsys, ["run", str(config), "--out", str(tmp_path / "run"), "--set", f"{section}.epochs={2**63}"],
            f"{section}.epochs: must be at most 100,000, got {2**63}")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ 3. model.max_length and the backbone's positions


@pytest.mark.parametrize(("family", "limit", "detail"), [("bert", 130, ""), ("roberta", 128, ", the first 2 reserved for padding")])
def test_a_max_length_beyond_the_position_table_is_refused_before_the_run_folder_exists(family, limit, detail, tmp_path,
                                                                                         tiny_models, capsys):
    config = tiny_config(tmp_path, tiny_models[family], model={"max_length": 200})
    with (tmp_path / "data" / "train.tsv").open("a") as f:
        f.write(" ".join(["good"] * 190) + "\t1\n")  # long enough to reach past the table
    out = tmp_path / "run"
    refused(capsys, ["run", str(config), "--out", str(out), "--quiet"],
            f"model.max_length: must be at most {limit} (the {family} backbone's position table: 130 positions{detail}), "
            f"got 200; lower model.max_length to {limit} or less")
    assert not out.exists()
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", f"model.max_length={limit}"]) == 0  # the limit itself fits


def test_a_decoder_refuses_tokens_and_prompt_slots_beyond_its_context(tiny_decoders):
    from spt.backbone import load_backbone
    from spt.errors import ConfigError

    backbone = load_backbone(str(tiny_decoders["llama"]))  # 256 positions
    with pytest.raises(ConfigError, match=r"^model.max_length: 250 tokens \+ 10 prompt slots exceed the 256-position context "
                       r"of this llama backbone; lower model.max_length to at most 246 \(or prompt.length\)$"):
        backbone.check_length(250, 10)
    backbone.check_length(246, 10)


# ------------------------------------------------------------------ 4. spt runs on damaged folders

GOOD_FILES = {
    "config.yaml": yaml.safe_dump({"task": {"name": "toy", "metric": "accuracy"}, "model": {"backbone": "tiny"}}),
    "metrics.json": json.dumps({"metric": "accuracy", "dev": {"accuracy": 0.75}, "test": {"accuracy": 0.5},
                                "trainable_params": 100, "search_seconds": 1.5, "retrain_seconds": 2}),
    "layer_mask.json": json.dumps({"k": 2, "selected_layers": [1, 3], "method": "gates"}),
}
DAMAGE = {  # folder -> (file, content, note)
    "config-list": ("config.yaml", "- a\n- b\n", "damaged: config.yaml"),
    "config-string": ("config.yaml", "just text\n", "damaged: config.yaml"),
    "config-task-string": ("config.yaml", yaml.safe_dump({"task": "toy", "model": {"backbone": "tiny"}}), "damaged: config.yaml"),
    "metrics-list": ("metrics.json", "[1, 2]", "damaged: metrics.json"),
    "metrics-dev-number": ("metrics.json", json.dumps({"metric": "accuracy", "dev": 0.7, "test": {"accuracy": 0.5}}), "damaged: metrics.json"),
    "metrics-binary": ("metrics.json", b"\xff\xfe\x00garbage", "damaged: metrics.json"),
    "mask-string": ("layer_mask.json", '"layers 1 and 3"', "damaged: layer_mask.json"),
    "mask-layers-text": ("layer_mask.json", json.dumps({"k": 2, "selected_layers": "1,3"}), "damaged: layer_mask.json"),
    "mask-not-json": ("layer_mask.json", "{k: 2", "damaged: layer_mask.json"),
}


def test_spt_runs_gives_a_damaged_folder_a_row_that_says_so_and_prints_every_other_row(tmp_path, capsys):
    import csv

    folders = []
    for name in ["good", *DAMAGE]:
        folder = tmp_path / name
        folder.mkdir()
        for file, content in GOOD_FILES.items():
            (folder / file).write_text(content)
        if name in DAMAGE:
            file, content, _ = DAMAGE[name]
            (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
        folders.append(str(folder))
    folders.append(str(tmp_path / "missing"))
    before = snapshot(tmp_path)
    assert main(["runs", *folders, "--format", "csv"]) == 0
    rows = {Path(r["run"]).name: r for r in csv.DictReader(capsys.readouterr().out.splitlines())}
    assert list(rows) == [Path(f).name for f in folders]
    good = rows["good"]
    assert (good["task"], good["k"], good["layers"], good["dev"], good["test"], good["note"]) == ("toy", "2", "[1, 3]", "0.7500", "0.5000", "")
    for name, (_, _, note) in DAMAGE.items():
        assert rows[name]["note"] == note, name
    assert rows["metrics-dev-number"]["test"] == "0.5000" and rows["metrics-dev-number"]["dev"] == ""  # what is readable stays
    assert rows["config-list"]["task"] == "?" and rows["config-list"]["dev"] == "0.7500"
    assert rows["mask-string"]["layers"] == "" and rows["mask-string"]["task"] == "toy"
    assert rows["missing"]["note"] == "not a directory"
    assert main(["runs", *folders]) == 0 and "| damaged: metrics.json |" in capsys.readouterr().out
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ 5. leftovers and vague messages


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_models):
    """A tiny search + retrain (its sparse model saved) and a file of texts to label."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config(root, tiny_models["bert"], n_train=16, search={"epochs": 1})
    run = root / "run"
    assert main(["run", str(config), "--out", str(run), "--quiet"]) == 0
    (root / "texts.txt").write_text("a great film\ni hate this plot\n")
    return root, run


def test_predict_refuses_a_directory_as_output_before_any_work(trained_run, tmp_path, capsys):
    root, run = trained_run
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    refused(capsys, ["predict", str(run), "--input", str(root / "texts.txt"), "--output", str(folder), "--force"],
            f"--output: {folder} is a directory; give a file name for the predictions, e.g. {folder / 'predictions.jsonl'}")
    assert snapshot(tmp_path) == {"predictions/keep.txt": b"mine"}  # no predictions.tmp beside it


def test_models_list_creates_nothing(tmp_path, monkeypatch, capsys):
    from spt import hub

    cache = tmp_path / "cache"
    monkeypatch.setenv("SPT_CACHE_DIR", str(cache))
    assert main(["models", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert list(listed) == list(hub.PACKAGED) and not cache.exists()
    monkeypatch.setattr(hub, "_mpnet_parts", lambda: [])  # installed, not yet joined and unzipped
    assert main(["models", "list"]) == 0
    assert json.loads(capsys.readouterr().out)["mpnet-base"] == f"installed; made into {cache / 'models' / 'all-mpnet-base-v2'} on first use"
    assert not cache.exists()


def test_a_backbone_mismatch_says_what_differs(trained_run, tmp_path, capsys):
    from conftest import make_tiny_model

    root, run = trained_run
    wider = make_tiny_model(tmp_path / "wider", "bert", hidden=64)  # 4 layers, bert, as the one it was trained on
    saved = json.loads((run / "sparse" / "prompt_config.json").read_text())
    err = refused(capsys, ["predict", str(run), "--input", str(root / "texts.txt"), "--backbone", str(wider)],
                  f"model.backbone: {run / 'sparse'} was trained on another backbone than {str(wider)!r} (hidden size: trained on 32, "
                  f"this one 64; fingerprint: trained on {saved['backbone_fingerprint']}, this one ")
    assert f"pass the one it was trained on ({saved['backbone']!r})" in err and "layers" not in err
    from spt.backbone import load_backbone
    from spt.serialization import backbone_differences

    backbone = load_backbone(str(wider))
    assert backbone_differences({**saved, "hidden_size": 64, "vocab_size": 999, "backbone_fingerprint": None}, backbone) == [
        f"vocabulary size: trained on 999, this one {backbone.config.vocab_size}"]


# ------------------------------------------------------------------ 6. mask fields of the wrong length


@pytest.mark.parametrize("field", ["spread", "gate_scores", "perturbation_scores"])
def test_a_mask_whose_per_layer_field_has_the_wrong_length_is_refused_before_a_run_is_made(field, trained_run, tmp_path, capsys):
    root, run = trained_run
    data = json.loads((run / "layer_mask.json").read_text())
    candidates = len(data["candidate_layers"])
    data[field] = [0.1] * (candidates + 1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "retrained"
    refused(capsys, ["retrain", str(root / "config.yaml"), "--mask", str(bad), "--out", str(out), "--quiet"],
            f"mask {bad}: field {field} has {candidates + 1} values for {candidates} candidate layers")
    assert not out.exists() and set(tmp_path.iterdir()) == {bad}
