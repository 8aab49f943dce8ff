"""Using a trained run: predictions for new text (``spt predict``), scores on a split or a
labelled file (``spt evaluate``), and one table across many runs (``spt runs``)."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.files import check_writable, write_text_atomic
from spt.model import SparsePromptModel
from spt.schema import conforms

from .config import RunConfig, split_view
from .data import DataError, Example, describe_layout, read_examples
from .metrics import compute_metrics
from .runs import RunDir
from .schema import METRICS


def load_run(run_dir: str | Path, backbone: str | None = None, quantize: str | None = None) -> tuple[RunConfig, SparsePromptModel]:
    """The config of a finished run and its retrained sparse model (eval mode; its backbone
    quantized as the run's, or as ``quantize`` says)."""
    run = RunDir(Path(run_dir))
    config = run.config()  # (errors name config.yaml)
    if not run.file("sparse").is_dir():
        raise UserError("run_dir", f"{run_dir} holds no retrained model (sparse/); run `spt run` or `spt retrain` first")
    return config, SparsePromptModel.from_pretrained(run.file("sparse"), backbone, quantize=quantize)


def read_inputs(config: RunConfig, path: str | Path, fmt: str) -> list[tuple[str, Example]]:
    """``text``: one input per line (a tab separates the two texts of a pair); ``task``: the
    file laid out as the task's test split, labels optional."""
    if fmt == "task":
        try:
            return read_examples(config.task, "test", path=path, require_labels=False)
        except DataError as exc:  # say what layout the run reads, not only what went wrong
            raise DataError(exc.field, f"{exc.problem}. Run {config.task.name!r} reads --input laid out as its test split: "
                            f"{describe_layout(split_view(config.task, 'test')[0])}") from None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError("--input", f"file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise UserError("--input", f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    inputs = [(f"line {n}", Example(*(line.split("\t", 1) + [None])[:2], -1)) for n, line in enumerate(lines, 1) if line.strip()]
    if not inputs:
        raise UserError("--input", f"{path} has no text")
    return inputs


def predict(model: SparsePromptModel, inputs: list[tuple[str, Example]], batch_size: int = 32) -> list[dict[str, Any]]:
    """One record per input: its position, the predicted label, the class probabilities and,
    where the input had one, the gold label."""
    scored = model.predict([(ex.text_a, ex.text_b) if ex.text_b is not None else ex.text_a for _, ex in inputs], batch_size)
    records = []
    for (position, example), result in zip(inputs, scored):
        record = {"id": position, "label": result["label"], "probabilities": {k: round(v, 6) for k, v in result["probabilities"].items()}}
        if example.label >= 0:
            record["gold"] = model.labels[example.label]
        records.append(record)
    return records


def scores(config: RunConfig, model: SparsePromptModel, records: list[dict[str, Any]]) -> dict[str, float]:
    """The task's metrics over the records that carry a gold label."""
    labelled = [r for r in records if "gold" in r]
    if not labelled:
        raise UserError("--input", "no input carries a label; `spt evaluate` needs labelled examples")
    index = {label: i for i, label in enumerate(model.labels)}
    task = config.task
    positive = index[task.positive_label] if task.positive_label is not None else None
    result = compute_metrics([index[r["gold"]] for r in labelled], [index[r["label"]] for r in labelled], task.metric, positive)
    result["n"] = len(labelled)
    return result


def check_output(output: str | None, force: bool) -> None:
    """Refuse, before any work, an ``--output`` that is a folder, exists (without ``force``) or
    cannot be written."""
    if output is None:
        return
    path = Path(output)
    if path.is_dir():
        raise UserError("--output", f"{path} is a directory; give a file name for the predictions, e.g. {path / 'predictions.jsonl'}")
    if path.exists() and not force:
        raise UserError("--output", f"{path} already exists; pass --force to overwrite it")
    check_writable(path, "--output")


def write_predictions(records: list[dict[str, Any]], output: str | None, force: bool) -> None:
    """The records as JSON lines, to ``output`` (written whole or not at all) or standard output."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    if output is None:
        sys.stdout.write(text)
        return
    check_output(output, force)
    write_text_atomic(Path(output), text)


RUN_COLUMNS = ["run", "task", "backbone", "k", "layers", "method", "dev", "test", "metric", "trainable_params", "search_s",
               "retrain_s", "note"]
NUMBER = (int, float)


def run_rows(run_dirs: list[str]) -> list[dict[str, Any]]:
    """One row per run directory, whatever state it is in: a folder that does not exist, or
    whose ``config.yaml``, ``metrics.json`` or ``layer_mask.json`` cannot be read or has the
    wrong structure, gets a row whose ``note`` says so (``damaged: metrics.json``) and empty
    cells for what it could not read; the other rows are unaffected."""
    return [_run_row(name) for name in run_dirs]


def _run_row(name: str) -> dict[str, Any]:
    path, damaged = Path(name), []
    config = _read_mapping(path / "config.yaml", damaged)
    metrics = _read_mapping(path / "metrics.json", damaged)
    if metrics and not conforms(metrics, METRICS):  # (what is readable still shows)
        _damage(damaged, "metrics.json")
    mask = _read_mapping(path / "layer_mask.json", damaged)
    task = _field(config, "task", dict, "config.yaml", damaged) or {}
    model = _field(config, "model", dict, "config.yaml", damaged) or {}
    metric = _field(metrics, "metric", str, "metrics.json", damaged) or _field(task, "metric", str, "config.yaml", damaged)
    layers = _field(mask, "selected_layers", list, "layer_mask.json", damaged)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in layers or []):
        layers = _damage(damaged, "layer_mask.json")
    row = {
        "run": name, "task": _field(task, "name", str, "config.yaml", damaged) or "?",
        "backbone": _field(model, "backbone", str, "config.yaml", damaged) or "?",
        "k": _field(mask, "k", int, "layer_mask.json", damaged), "layers": layers,
        "method": _field(mask, "method", str, "layer_mask.json", damaged),
        "dev": _score(metrics, "dev", metric, damaged), "test": _score(metrics, "test", metric, damaged), "metric": metric,
        "trainable_params": _field(metrics, "trainable_params", int, "metrics.json", damaged),
        "search_s": _field(metrics, "search_seconds", NUMBER, "metrics.json", damaged),
        "retrain_s": _field(metrics, "retrain_seconds", NUMBER, "metrics.json", damaged),
    }
    note = "" if path.is_dir() else "not a directory"
    return {**row, "note": f"damaged: {', '.join(damaged)}" if damaged else note}


def _read_mapping(path: Path, damaged: list[str]) -> dict[str, Any]:
    """The mapping a run file holds ({} when it is absent); unreadable, not JSON/YAML, or not
    a mapping: {} and the file's name in ``damaged``."""
    import yaml

    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError):  # (JSONDecodeError is a ValueError)
        data = None
    return data if isinstance(data, dict) else _damage(damaged, path.name) or {}


def _field(data: dict[str, Any], key: str, kinds: type | tuple[type, ...], file: str, damaged: list[str]) -> Any:
    """``data[key]`` if it is of ``kinds`` ("" when absent); of another type: "" and ``file`` is damaged."""
    value = data.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, kinds):
        return _damage(damaged, file)
    return value


def _damage(damaged: list[str], file: str) -> str:
    if file not in damaged:
        damaged.append(file)
    return ""


def _score(metrics: dict[str, Any], split: str, metric: str, damaged: list[str]) -> str:
    scores = _field(metrics, split, dict, "metrics.json", damaged) or {}
    value = _field(scores, metric, NUMBER, "metrics.json", damaged) if metric else ""
    return "" if value == "" else f"{value:.4f}"


def runs_table(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    lines = ["| " + " | ".join(RUN_COLUMNS) + " |", "|" + "---|" * len(RUN_COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in RUN_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
