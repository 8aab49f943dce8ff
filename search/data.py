"""Task data: read the declared files into labelled examples, with clear errors.

Every problem names the file, the line (or record) and the field, so a user can fix it.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.files import read_text

from .config import TaskConfig, split_view

_FIELD = re.compile(r"{([^{}]+)}")


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int


@dataclass
class TaskData:
    """The three splits of a task; labels are indices into ``labels``."""

    name: str
    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


class DataError(UserError):
    """A data file cannot be read as declared."""


# A TSV/CSV field may be as long as the file: no 128 KiB limit (a long document is data, not an error).
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _records_tsv_csv(path: Path, text: str, task: TaskConfig, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    names = task.columns
    try:
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if task.header and names is None:
                names = [cell.strip() for cell in row]
                continue
            if names is None:
                names = [str(i) for i in range(len(row))]
            if len(row) != len(names):
                raise DataError(
                    f"{path} line {reader.line_num}: {len(row)} columns, expected {len(names)} ({', '.join(names)}); "
                    f"check task.format ({task.format}) and task.header"
                )
            yield f"line {reader.line_num}", dict(zip(names, row))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}", f"cannot be read as {task.format} ({exc})") from None


def _records_jsonl(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {line_no}", f"not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {line_no}", f"expected a JSON object, got {type(record).__name__}")
        yield f"line {line_no}", record


def _records_json(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {exc.lineno}", f"not valid JSON ({exc.msg})") from None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None:
        raise DataError(path, "expected a JSON list of records or an id -> record mapping")
    for key, record in items:
        if not isinstance(record, dict):
            raise DataError(f"{path} record {key!r}", f"expected a JSON object, got {type(record).__name__}")
        yield f"record {key!r}", record


def _records_label_text(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise DataError(f"{path} line {line_no}", f"expected 'label text', got {line[:60]!r}")
        yield f"line {line_no}", {"label": parts[0], "text": parts[1]}


def _records_hf(task: TaskConfig, split: str, seed: int) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise UserError("task.format", "'hf' needs the datasets package: pip install datasets") from None
    hf = task.hf or {}
    split_name = (hf.get("splits") or {}).get(split, {"dev": "validation"}.get(split, split))
    kwargs = {"data_files": hf["data_files"]} if hf.get("data_files") else {}
    try:
        dataset = datasets.load_dataset(hf["path"], hf.get("name"), split=split_name, **kwargs)
    except Exception as exc:  # the datasets library raises many types for a missing hub
        raise UserError("task.hf", f"cannot load {hf['path']}/{hf.get('name')} split {split_name!r} ({exc})") from None
    for index, record in enumerate(dataset):
        yield f"record {index}", dict(record)


def _scalar(record: dict[str, Any], name: str, where: str, field_name: str) -> Any:
    """A field's value, refused when it is a list or mapping (text and labels are scalars)."""
    value = record[name]
    if isinstance(value, (list, dict)):
        raise DataError(where, f"field {name!r} for {field_name} holds a JSON {'list' if isinstance(value, list) else 'object'}, "
                        "expected text or a number; point the task at a text field")
    return value


def _label_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _text(record: dict[str, Any], spec: str, where: str, field_name: str) -> str:
    """A text field: a field name, or a template such as ``"{premise} {question}"``."""
    names = _FIELD.findall(spec) if "{" in spec else [spec]
    missing = [n for n in names if n not in record]
    if missing:
        raise DataError(
            f"{where}: no field {missing[0]!r} for task.{field_name} (fields: {', '.join(map(str, record))})"
        )
    values = {n: _scalar(record, n, where, f"task.{field_name}") for n in names}
    if "{" not in spec:
        return "" if values[spec] is None else str(values[spec])
    return spec.format_map({n: "" if v is None else v for n, v in values.items()})


def describe_layout(task: TaskConfig) -> str:
    """How a file of ``task``'s examples is laid out, in words a user can follow to write one."""
    fields = f"the label in {task.label!r}, the text in {task.text_a!r}" + (f" and {task.text_b!r}" if task.text_b else "")
    if task.format == "label_text":
        return f"one example per line, the label, a space, then the text (e.g. '{task.labels[0]} a short text'; labels {task.labels})"
    if task.format in ("tsv", "csv"):
        sep = "tab" if task.format == "tsv" else "comma"
        if task.columns:
            names = f"columns {', '.join(task.columns)} and no header row"
        else:
            names = "a header row naming the columns" if task.header else "numbered columns (0, 1, ...) and no header row"
        return f"{sep}-separated values with {names}; {fields} (labels {task.labels})"
    if task.format == "jsonl":
        return f"one JSON object per line with {fields} (labels {task.labels})"
    if task.format == "json":
        return f"a JSON list of objects with {fields} (labels {task.labels})"
    return f"task.format {task.format!r} with {fields} (labels {task.labels})"


def read_split(task: TaskConfig, split: str, seed: int = 0) -> list[Example]:
    """Read one split (``train``, ``dev`` or ``test``) as declared in ``task``."""
    return [example for _, example in read_examples(task, split, seed)]


def read_examples(task: TaskConfig, split: str, seed: int = 0, path: str | Path | None = None,
                  require_labels: bool = True) -> list[tuple[str, Example]]:
    """``(position, example)`` of one split, or of the file ``path`` laid out as that split.

    Without ``require_labels`` a record with no label field is kept with label -1
    (unknown): new text to predict.
    """
    label_index = {label: i for i, label in enumerate(task.labels)}
    task, split_path = split_view(task, split)
    if task.format == "hf" and path is None:
        records = _records_hf(task, split, seed)
        source = f"{task.hf['path']}[{split}]"
    else:
        field = "--input" if path is not None else f"task.{split}"
        file = Path(path if path is not None else split_path)
        if not file.is_file():
            raise DataError(field, f"file {file} does not exist")
        source = str(file)
        text = read_text(file, field)
        readers = {
            "tsv": lambda: _records_tsv_csv(file, text, task, "\t"),
            "csv": lambda: _records_tsv_csv(file, text, task, ","),
            "jsonl": lambda: _records_jsonl(file, text),
            "json": lambda: _records_json(file, text),
            "label_text": lambda: _records_label_text(file, text),
        }
        if task.format not in readers:
            raise DataError("task.format", f"{task.format!r} data cannot be read from a file; give a file in another format")
        records = readers[task.format]()
    examples = []
    for position, record in records:
        where = f"{source} {position}"
        label = -1
        if task.label not in record and require_labels:
            raise DataError(where, f"no field {task.label!r} for task.label (fields: {', '.join(map(str, record))})")
        if task.label in record:
            value = _label_value(_scalar(record, task.label, where, "task.label"))
            if value not in label_index:
                raise DataError(where, f"label {value!r} is not in task.labels {task.labels}")
            label = label_index[value]
        text_a = _text(record, task.text_a, where, "text_a")
        text_b = _text(record, task.text_b, where, "text_b") if task.text_b else None
        examples.append((position, Example(text_a, text_b, label)))
    if not examples:
        raise DataError(f"task.{split}" if path is None else "--input", f"{source} has no examples")
    return examples


def _subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def _per_label(examples: list[Example], shots: int, seed: int) -> tuple[list[Example], list[Example]]:
    """``shots`` examples of each label (seeded; all of a label that has fewer), and the rest."""
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in sorted({ex.label for ex in examples}):
        rows = [i for i, ex in enumerate(examples) if ex.label == label]
        chosen.update(rng.sample(rows, min(shots, len(rows))))
    return [examples[i] for i in sorted(chosen)], [ex for i, ex in enumerate(examples) if i not in chosen]


def load_task(task: TaskConfig, seed: int) -> TaskData:
    """All splits of ``task``; ``seed`` fixes subsampling and a held-out dev split.

    With ``shots_per_label`` the training set is a seeded k-shot sample (k per label) and,
    when no dev file is given, the dev set is another k per label from what remains (as
    LM-BFF draws its few-shot splits).
    """
    train = read_split(task, "train", seed)
    has_dev = task.dev is not None or (task.format == "hf" and "dev" in ((task.hf or {}).get("splits") or {"dev": 1}))
    dev = read_split(task, "dev", seed) if has_dev else None
    if task.shots_per_label is not None:
        train, rest = _per_label(train, task.shots_per_label, seed)
        if dev is None:
            dev, _ = _per_label(rest, task.shots_per_label, seed + 1)
    elif dev is None:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_dev = max(1, round(task.dev_fraction * len(train)))
        dev_ids = set(order[:n_dev])
        dev = [train[i] for i in sorted(dev_ids)]
        train = [ex for i, ex in enumerate(train) if i not in dev_ids]
    test = read_split(task, "test", seed)
    return TaskData(
        name=task.name,
        labels=list(task.labels),
        train=_subsample(train, task.max_train, seed),
        dev=_subsample(dev, task.max_dev, seed + 1),
        test=_subsample(test, task.max_test, seed + 2),
    )
