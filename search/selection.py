"""Selection: rank layers by their gates, keep the top-K or what fits a budget, and the
versioned ``layer_mask.json`` that carries the result."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.phm import phm_parameter_count

MASK_FORMAT = "spt-layer-mask"
MASK_VERSION = 1


@dataclass
class LayerMask:
    """The layers chosen to receive prompts (the content of ``layer_mask.json``).

    ``scores[j]`` is the score (final gate) of ``candidate_layers[j]``; ``mask`` has one
    entry per backbone layer.
    """

    backbone: str
    num_layers: int
    candidate_layers: list[int]
    selected_layers: list[int]
    mask: list[int]
    scores: list[float]
    k: int
    param_budget: int | None
    trainable_params: int
    prompt_length: int
    task: str
    seed: int
    format: str = MASK_FORMAT
    version: int = MASK_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        ordered = {"format": data.pop("format"), "version": data.pop("version")}
        ordered.update(data)
        return ordered


def generator_parameters(hidden_size: int, bottleneck: int, phm_n: int) -> int:
    """Trainable parameters of one prompt generator (down and up PHM layers)."""
    return phm_parameter_count(hidden_size, bottleneck, phm_n) + phm_parameter_count(bottleneck, hidden_size, phm_n)


def rank_layers(candidates: list[int], scores: list[float]) -> list[int]:
    """Candidates by decreasing score; ties go to the lower layer."""
    return [layer for _, layer in sorted(zip(scores, candidates), key=lambda t: (-t[0], t[1]))]


def choose_k(num_candidates: int, k: int | None, budget: int | None, per_generator: int) -> int:
    """How many layers to keep: ``k`` itself, or the most generators that fit ``budget``."""
    if k is not None:
        if k > num_candidates:
            raise UserError("select.k", f"K={k} is larger than the {num_candidates} candidate layers")
        return k
    assert budget is not None
    fit = min(num_candidates, budget // per_generator)
    if fit < 1:
        raise UserError(
            f"select.budget: a budget of {budget} parameters fits no layer; one generator needs {per_generator}"
        )
    return fit


def select_layers(
    *,
    backbone: str,
    num_layers: int,
    candidates: list[int],
    scores: list[float],
    k: int | None,
    budget: int | None,
    per_generator: int,
    head_params: int,
    prompt_length: int,
    task: str,
    seed: int,
) -> LayerMask:
    """Build the :class:`LayerMask` for the given gate ``scores``."""
    keep = choose_k(len(candidates), k, budget, per_generator)
    selected = sorted(rank_layers(candidates, scores)[:keep])
    return LayerMask(
        backbone=backbone,
        num_layers=num_layers,
        candidate_layers=list(candidates),
        selected_layers=selected,
        mask=[1 if i in selected else 0 for i in range(num_layers)],
        scores=[round(float(s), 6) for s in scores],
        k=keep,
        param_budget=budget,
        trainable_params=keep * per_generator + head_params,
        prompt_length=prompt_length,
        task=task,
        seed=seed,
    )


def write_mask(mask: LayerMask, path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise UserError("--out", f"{path} already exists; pass --force to overwrite it")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(mask.to_json(), indent=2) + "\n")
    tmp.replace(path)


def read_mask(path: str | Path, backbone: str | None = None, num_layers: int | None = None) -> LayerMask:
    """Read and validate a ``layer_mask.json`` (optionally against a backbone)."""
    path = Path(path)
    where = f"mask {path}"
    if not path.is_file():
        raise UserError(where, "file does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(where, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != MASK_FORMAT:
        raise UserError(where, f"field format must be {MASK_FORMAT!r}; is this a layer mask?")
    if data.get("version") != MASK_VERSION:
        raise UserError(where, f"field version is {data.get('version')!r}; this spt-search reads version {MASK_VERSION}")
    required = [f for f in LayerMask.__dataclass_fields__ if f not in ("format", "version")]
    missing = [f for f in required if f not in data]
    if missing:
        raise UserError(where, f"missing field {missing[0]!r}")
    unknown = sorted(set(data) - set(LayerMask.__dataclass_fields__))
    if unknown:
        raise UserError(where, f"unknown field {unknown[0]!r}")
    mask = LayerMask(**data)
    n = mask.num_layers
    if not isinstance(n, int) or n < 1:
        raise UserError(where, f"field num_layers must be a positive integer, got {n!r}")
    if len(mask.mask) != n or any(v not in (0, 1) for v in mask.mask):
        raise UserError(where, f"field mask must be {n} values of 0/1, got {mask.mask}")
    if sorted(i for i, v in enumerate(mask.mask) if v) != sorted(mask.selected_layers):
        raise UserError(where, f"fields mask and selected_layers disagree ({mask.mask} vs {mask.selected_layers})")
    if not mask.selected_layers:
        raise UserError(where, "field selected_layers is empty")
    if not set(mask.selected_layers) <= set(mask.candidate_layers):
        raise UserError(where, f"selected_layers {mask.selected_layers} are not all in candidate_layers {mask.candidate_layers}")
    if len(mask.scores) != len(mask.candidate_layers):
        raise UserError(where, f"field scores has {len(mask.scores)} values for {len(mask.candidate_layers)} candidate layers")
    if mask.k != len(mask.selected_layers):
        raise UserError(where, f"field k={mask.k} but {len(mask.selected_layers)} layers are selected")
    if backbone is not None and mask.backbone != backbone:
        raise UserError(
            f"{where}: made for backbone {mask.backbone!r}, but the config uses {backbone!r}; "
            f"retrain with --set model.backbone={mask.backbone} or search again for this backbone"
        )
    if num_layers is not None and n != num_layers:
        raise UserError(where, f"made for {n} layers, but the backbone has {num_layers}")
    return mask


# ---------------------------------------------------------------------- gate history


GATES_HEADER = ["step", "epoch", "layer", "alpha"]


def read_gate_history(path: Path) -> list[dict[str, Any]]:
    """Rows of ``gates.csv`` as dicts with typed values."""
    if not path.is_file():
        raise UserError(path.parent, f"no gate history ({path.name}); is it a finished or running search directory?")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != GATES_HEADER:
            raise UserError(path, f"header must be {','.join(GATES_HEADER)}, got {reader.fieldnames}")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            try:
                rows.append({"step": int(row["step"]), "epoch": int(row["epoch"]), "layer": int(row["layer"]), "alpha": float(row["alpha"])})
            except (TypeError, ValueError):
                raise UserError(f"{path} line {line_no}", f"not a valid gate row: {row}") from None
    if not rows:
        raise UserError(path, "the gate history is empty; the search logged no step")
    return rows


def final_scores(rows: list[dict[str, Any]], candidates: list[int], average_last: int = 1) -> list[float]:
    """Gate of each candidate averaged over the last ``average_last`` logged steps."""
    steps = sorted({r["step"] for r in rows})[-average_last:]
    chosen = set(steps)
    by_layer: dict[int, list[float]] = {c: [] for c in candidates}
    for r in rows:
        if r["step"] in chosen and r["layer"] in by_layer:
            by_layer[r["layer"]].append(r["alpha"])
    missing = [c for c, v in by_layer.items() if not v]
    if missing:
        raise UserError("gates.csv", f"no gate values for layers {missing} in the last {average_last} logged steps")
    return [sum(v) / len(v) for v in (by_layer[c] for c in candidates)]
