"""Task data: every declared format, templates, held-out dev, and each bad-input message."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA
from helpers import tiny_config

from search.cli import main
from search.config import TaskConfig, load_config
from search.data import DataError, load_task, read_split


def _task(tmp_path, **kw) -> TaskConfig:
    base = dict(name="t", labels=["0", "1"], data_dir=str(tmp_path))
    base.update(kw)
    for split in ("train", "dev", "test"):
        if base.get(split):
            base[split] = str(tmp_path / base[split])
    return TaskConfig(**base)


def test_tsv_with_header_and_bom(tmp_path):
    (tmp_path / "a.tsv").write_text('\ufeffQuality\tA\tB\n1\tx " y\tz\n0\tp\tq\n')
    task = _task(tmp_path, format="tsv", train="a.tsv", text_a="A", text_b="B", label="Quality")
    examples = read_split(task, "train")
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [('x " y', "z", 1), ("p", "q", 0)]


def test_headerless_csv_with_columns_and_template(tmp_path):
    (tmp_path / "a.csv").write_text('2,"Title, one",Body one\n1,Title two,"Body, two"\n')
    task = _task(tmp_path, format="csv", header=False, columns=["label", "title", "body"], train="a.csv",
                 text_a="{title}. {body}", labels=["1", "2"])
    examples = read_split(task, "train")
    assert examples[0].text_a == "Title, one. Body one" and examples[0].label == 1


def test_jsonl_boolean_labels_and_json_mapping(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"q": "is it", "p": "yes", "label": true}\n\n{"q": "no", "p": "x", "label": false}\n')
    task = _task(tmp_path, format="jsonl", train="a.jsonl", text_a="q", text_b="p", labels=["false", "true"])
    assert [e.label for e in read_split(task, "train")] == [1, 0]
    (tmp_path / "b.json").write_text(json.dumps({"0": {"text_a": "x", "text_b": None, "label": "1"}, "1": {"text_a": "y", "label": "0"}}))
    task = _task(tmp_path, format="json", train="b.json", text_a="text_a")
    assert [(e.text_a, e.label) for e in read_split(task, "train")] == [("x", 1), ("y", 0)]


def test_label_text_lines(tmp_path):
    (tmp_path / "a.txt").write_text("1 a fine movie .\n0 dull\n")
    task = _task(tmp_path, format="label_text", train="a.txt", text_a="text")
    assert [(e.text_a, e.label) for e in read_split(task, "train")] == [("a fine movie .", 1), ("dull", 0)]


def test_dev_is_held_out_from_train_when_missing(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"{i % 2} sentence {i}\n" for i in range(40)))
    task = _task(tmp_path, format="label_text", train="a.txt", test="a.txt", text_a="text", dev_fraction=0.25)
    data = load_task(task, seed=3)
    assert data.sizes() == {"train": 30, "dev": 10, "test": 40}
    assert not {e.text_a for e in data.dev} & {e.text_a for e in data.train}
    assert [e.text_a for e in load_task(task, seed=3).dev] == [e.text_a for e in data.dev]


def test_bad_rows_name_file_line_and_field(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence\tlabel\nok\t1\nbad\t7\n")
    task = _task(tmp_path, format="tsv", train="a.tsv")
    with pytest.raises(DataError, match=r"a.tsv line 3: label '7' is not in task.labels \['0', '1'\]"):
        read_split(task, "train")
    task = _task(tmp_path, format="tsv", train="a.tsv", text_a="text")
    with pytest.raises(DataError, match=r"a.tsv line 2: no field 'text' for task.text_a \(fields: sentence, label\)"):
        read_split(task, "train")


# ------------------------------------------------------------------ through the CLI: message + exit status 2


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: (d / "train.tsv").unlink(), r"task.train: file .*train.tsv does not exist"),
        (lambda d: (d / "dev.tsv").write_text("sentence\tlabel\n"), r"task.dev: .*dev.tsv has no examples"),
        (lambda d: (d / "test.tsv").write_text("sentence\tlabel\ngood\tpositive\n"), r"test.tsv line 2: label 'positive' is not in task.labels"),
        (lambda d: (d / "train.tsv").write_text("sentence\tstars\ngood\t1\n"), r"train.tsv line 2: no field 'label' for task.label"),
    ],
    ids=["missing-file", "empty-split", "unknown-label", "missing-column"],
)
def test_bad_data_exits_2_with_one_message_and_writes_nothing(tmp_path, tiny_bert, capsys, mutate, message):
    config = tiny_config(tmp_path, tiny_bert)
    mutate(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert __import__("re").search(message, err[0]), err[0]
    assert not out.exists()


def test_bad_config_values_exit_2(tmp_path, tiny_bert, capsys):
    config = tiny_config(tmp_path, tiny_bert)
    cases = [
        (["--set", "prompt.phm_n=3"], "prompt.phm_n: n=3 does not divide hidden_size=32"),
        (["--set", "select.k=9"], "select.k: K=9 is larger than the 4 candidate layers"),
        (["--set", "task.metric=auc"], "task.metric: unknown metric 'auc'"),
        (["--set", "search.bogus=1"], "search.bogus: unknown field"),
        (["--set", "model.backbone=" + str(tmp_path / "missing" / "model")], "model.backbone: no model directory"),
    ]
    for extra, message in cases:
        code = main(["run", str(config), "--out", str(tmp_path / "r"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_every_shipped_config_reads_its_data():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "configs"
    configs = sorted(p for p in root.rglob("*.yaml") if p.name != "defaults.yaml")
    assert len(configs) >= 27
    for path in configs:
        config = load_config(path)
        data = load_task(config.task, config.seed)
        assert min(data.sizes().values()) > 0, path
        assert {e.label for e in data.train} == set(range(len(config.task.labels))), path


def test_hugging_face_datasets_path_with_local_files(tmp_path):
    pytest.importorskip("datasets")
    for split, rows in {"train": [("good", 1), ("bad", 0)], "validation": [("fine", 1)]}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows))
    hf = {"path": "json", "data_files": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl")},
          "splits": {"train": "train", "dev": "validation", "test": "validation"}}
    task = TaskConfig(name="t", format="hf", hf=hf, labels=["0", "1"], text_a="sentence")
    data = load_task(task, seed=0)
    assert [(e.text_a, e.label) for e in data.train] == [("good", 1), ("bad", 0)]
    assert [(e.text_a, e.label) for e in data.test] == [("fine", 1)]


def test_instruction_opens_every_input_and_is_never_cut(tiny_decoders):
    """``task.instruction`` is a line before the input: segment A of a classifier's input and the
    first line before a verbalizer's template; truncation cuts the input, not the instruction."""
    from search.data import Example
    from spt import HeadConfig
    from spt.backbone import load_hf_model
    from spt.inputs import encode_split

    tok = load_hf_model(str(tiny_decoders["gpt2"]))[1]
    examples = [Example("a great film", None, 1), Example(" ".join(["really fun"] * 40), None, 0)]
    instruction = "is it good or bad ?"
    plain = encode_split(tok, examples, 16, HeadConfig())
    told = encode_split(tok, examples, 16, HeadConfig(), instruction)
    assert tok.decode(told.input_ids[0]) == f"{instruction}\na great film"
    assert tok.decode(plain.input_ids[0]) == "a great film"
    assert len(told.input_ids[1]) == 16 and tok.decode(told.input_ids[1]).startswith(f"{instruction}\nreally fun")
    verbalizer = HeadConfig(type="clm", template="{text_a} it was {mask} .", label_words={"0": "bad", "1": "good"})
    scored = encode_split(tok, examples, 16, verbalizer, instruction)
    assert tok.decode(scored.input_ids[0]) == f"{instruction}\na great film it was"
    assert len(scored.input_ids[1]) <= 16 and tok.decode(scored.input_ids[1]).startswith(f"{instruction}\nreally")
    assert tok.decode(scored.input_ids[1]).endswith(" it was")  # the template's end survives the cut
