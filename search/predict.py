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
from spt.files import write_text_atomic
from spt.model import SparsePromptModel

from .config import RunConfig, config_from_run_dict, split_view
from .data import DataError, Example, describe_layout, read_examples
from .metrics import compute_metrics
from .runs import RunDir


def load_run(run_dir: str | Path, backbone: str | None = None) -> tuple[RunConfig, SparsePromptModel]:
    """The config of a finished run and its retrained sparse model (eval mode)."""
    run = RunDir(Path(run_dir))
    recorded = run.recorded_config()
    if recorded is None:
        raise UserError("run_dir", f"{run_dir} has no config.yaml; is it an spt run directory?")
    if not run.file("sparse").is_dir():
        raise UserError("run_dir", f"{run_dir} holds no retrained model (sparse/); run `spt run` or `spt retrain` first")
    return config_from_run_dict(recorded), SparsePromptModel.from_pretrained(run.file("sparse"), backbone)


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


def write_predictions(records: list[dict[str, Any]], output: str | None, force: bool) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    if output is None:
        sys.stdout.write(text)
        return
    path = Path(output)
    if path.exists() and not force:
        raise UserError("--output", f"{path} already exists; pass --force to overwrite it")
    write_text_atomic(path, text)


RUN_COLUMNS = ["run", "task", "backbone", "k", "layers", "method", "dev", "test", "metric", "trainable_params", "search_s", "retrain_s"]


def run_rows(run_dirs: list[str]) -> list[dict[str, Any]]:
    """One row per run directory with a ``metrics.json`` (others are listed with what they lack)."""
    rows = []
    for name in run_dirs:
        run = RunDir(Path(name))
        config, metrics, mask = run.recorded_config() or {}, _json(run.file("metrics.json")), _json(run.file("layer_mask.json"))
        m = (metrics or {}).get("metric", config.get("task", {}).get("metric", ""))
        rows.append({
            "run": name, "task": config.get("task", {}).get("name", "?"), "backbone": config.get("model", {}).get("backbone", "?"),
            "k": (mask or {}).get("k", ""), "layers": (mask or {}).get("selected_layers", ""), "method": (mask or {}).get("method", ""),
            "dev": _score(metrics, "dev", m), "test": _score(metrics, "test", m), "metric": m,
            "trainable_params": (metrics or {}).get("trainable_params", ""),
            "search_s": (metrics or {}).get("search_seconds", ""), "retrain_s": (metrics or {}).get("retrain_seconds", ""),
        })
    return rows


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _score(metrics: dict[str, Any] | None, split: str, metric: str) -> str:
    value = ((metrics or {}).get(split) or {}).get(metric)
    return "" if value is None else f"{value:.4f}"


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
