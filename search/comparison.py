"""The results table of ``spt compare``: one row per strategy, seed and draw in
``compare.csv`` (written as rows finish, so a comparison resumes), and per strategy the mean
+- std over its runs as Markdown. Its picture is drawn by :mod:`analysis.comparison` (the
CLI hands it the :class:`Chart` a command describes), so ``search`` draws nothing itself.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.files import read_text, write_text_atomic


@dataclass
class Chart:
    """A picture a command asks for: ``kind`` (``comparison``: per-strategy summary rows;
    ``fronts``: name -> rows of a score against size), the data, the metric, where it goes
    and its title."""

    kind: str
    data: Any
    metric: str
    path: Path
    title: str


COLUMNS = [
    "strategy", "seed", "draw", "layers", "dev", "test", "trainable_params",
    "search_steps", "search_seconds", "train_steps", "train_seconds", "note",
]


def write_rows_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the result rows (atomically: a kill leaves the previous rows or the new ones)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def read_rows_csv(path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(read_text(path, str(path)), newline=""))
    try:
        return list(reader)
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}", f"is damaged ({exc}); delete it to compare from scratch") from None


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per strategy, in first-seen order: mean and std of dev/test, means of costs."""
    order: list[str] = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = row["strategy"]
        if name not in groups:
            order.append(name)
            groups[name] = []
        groups[name].append(row)
    summary = []
    for name in order:
        group = groups[name]
        dev, dev_sd = _mean_std([float(r["dev"]) for r in group])
        test, test_sd = _mean_std([float(r["test"]) for r in group])
        layer_sets = sorted({str(r["layers"]) for r in group})
        summary.append({
            "strategy": name, "runs": len(group), "dev": dev, "dev_std": dev_sd, "test": test, "test_std": test_sd,
            "trainable_params": statistics.fmean(int(r["trainable_params"]) for r in group),
            "search_steps": statistics.fmean(int(r["search_steps"]) for r in group),
            "search_seconds": statistics.fmean(float(r["search_seconds"]) for r in group),
            "train_seconds": statistics.fmean(float(r["train_seconds"]) for r in group),
            "layers": layer_sets[0] if len(layer_sets) == 1 else f"{len(layer_sets)} distinct",
            "note": "; ".join(sorted({r.get("note", "") for r in group if r.get("note")})),
        })
    return summary


def markdown_table(summary: Sequence[dict[str, Any]], metric: str) -> str:
    lines = [
        f"| strategy | runs | dev {metric} | test {metric} | trainable params | layers | search steps | search s | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['strategy']} | {s['runs']} | {100 * s['dev']:.1f} ± {100 * s['dev_std']:.1f} | "
            f"{100 * s['test']:.1f} ± {100 * s['test_std']:.1f} | {s['trainable_params']:,.0f} | {s['layers']} | "
            f"{s['search_steps']:.0f} | {s['search_seconds']:.0f} | {s['train_seconds']:.0f} |"
        )
    notes = [f"{s['strategy']}: {s['note']}" for s in summary if s["note"]]
    if notes:
        lines += ["", "Notes: " + " | ".join(notes)]
    return "\n".join(lines)
