"""Selection: rank the candidate layers, keep the top-K or what fits a budget, and the
versioned ``layer_mask.json`` that carries the result.

Rankings (``select.method``):

* ``gates`` - by the final gate ``alpha`` (or its mean over the last logged steps);
* ``perturbation`` - by how much the supernet's dev loss rises when the layer's prompt is
  removed (Wang et al., "Rethinking Architecture Selection in Differentiable NAS", 2021);
* ``greedy`` - progressively: the layer whose prompt, added to those already chosen
  (at full strength, the others removed), lowers the dev loss most, then the next;
* ``combined`` - the mean of a layer's rank by gates and by perturbation.

Every score comes with a spread (the gate's standard deviation over the averaged steps,
or a bootstrap over the dev examples), and the mask says when the K-th and the (K+1)-th
layer are not separated beyond it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spt.errors import UserError
from spt.files import read_text, write_json_atomic
from spt.hub import same_model
from spt.phm import phm_parameter_count
from spt.typed import field_types, typed

MASK_FORMAT = "spt-layer-mask"
MASK_VERSION = 2  # 2 adds method, spread, uncertain, gate_scores, perturbation_scores
READABLE_VERSIONS = (1, 2)


@dataclass
class LayerMask:
    """The layers chosen to receive prompts (the content of ``layer_mask.json``).

    ``scores[j]`` is the score of ``candidate_layers[j]`` under ``method`` (higher: more
    important) and ``spread[j]`` its uncertainty; ``mask`` has one entry per backbone layer.
    ``uncertain`` is true when the K-th and the (K+1)-th layer's scores differ by less than
    the larger of their spreads.
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
    method: str = "gates"
    spread: list[float] | None = None
    uncertain: bool = False
    gate_scores: list[float] | None = None
    perturbation_scores: list[float] | None = None
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


@dataclass
class Ranking:
    """A method's scores per candidate, their spreads, and the candidates best first."""

    method: str
    scores: list[float]
    spread: list[float]
    order: list[int]
    gate_scores: list[float] | None = None
    perturbation_scores: list[float] | None = None
    summary: str = ""  # one line in words: what was measured and why the order is what it is

    @classmethod
    def by_score(cls, method: str, candidates: list[int], scores: list[float], spread: list[float], **extra) -> Ranking:
        return cls(method, scores, spread, rank_layers(candidates, scores), **extra)


def select_layers(
    *,
    backbone: str,
    num_layers: int,
    candidates: list[int],
    ranking: Ranking,
    k: int | None,
    budget: int | None,
    per_generator: int,
    head_params: int,
    prompt_length: int,
    task: str,
    seed: int,
) -> LayerMask:
    """Build the :class:`LayerMask` of the first ``k`` (or what fits ``budget``) in ``ranking``."""
    keep = choose_k(len(candidates), k, budget, per_generator)
    selected = sorted(ranking.order[:keep])
    return LayerMask(
        backbone=backbone,
        num_layers=num_layers,
        candidate_layers=list(candidates),
        selected_layers=selected,
        mask=[1 if i in selected else 0 for i in range(num_layers)],
        scores=_rounded(ranking.scores),
        k=keep,
        param_budget=budget,
        trainable_params=keep * per_generator + head_params,
        prompt_length=prompt_length,
        task=task,
        seed=seed,
        method=ranking.method,
        spread=_rounded(ranking.spread),
        uncertain=uncertain(candidates, ranking, keep),
        gate_scores=_rounded(ranking.gate_scores),
        perturbation_scores=_rounded(ranking.perturbation_scores),
    )


def _rounded(values: list[float] | None) -> list[float] | None:
    return None if values is None else [round(float(v), 6) for v in values]


def uncertain(candidates: list[int], ranking: Ranking, keep: int) -> bool:
    """Whether the last kept and the first dropped layer are within each other's spread."""
    if keep >= len(candidates):
        return False
    kept, dropped = (candidates.index(ranking.order[i]) for i in (keep - 1, keep))
    gap = abs(ranking.scores[kept] - ranking.scores[dropped])
    return gap < max(ranking.spread[kept], ranking.spread[dropped])


def write_mask(mask: LayerMask, path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise UserError("--out", f"{path} already exists; pass --force to overwrite it")
    write_json_atomic(path, mask.to_json())


def read_mask(path: str | Path, backbone: str | None = None, num_layers: int | None = None) -> LayerMask:
    """Read and validate a ``layer_mask.json`` (optionally against a backbone)."""
    path = Path(path)
    where = f"mask {path}"
    if not path.is_file():
        raise UserError(where, "file does not exist")
    try:
        data = json.loads(read_text(path, where))
    except json.JSONDecodeError as exc:
        raise UserError(where, f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != MASK_FORMAT:
        raise UserError(where, f"field format must be {MASK_FORMAT!r}; is this a layer mask?")
    if data.get("version") not in READABLE_VERSIONS:
        raise UserError(where, f"field version is {data.get('version')!r}; this spt-search reads versions {READABLE_VERSIONS}")
    optional = {"format", "version", "method", "spread", "uncertain", "gate_scores", "perturbation_scores"}
    required = [f for f in LayerMask.__dataclass_fields__ if f not in optional]
    missing = [f for f in required if f not in data]
    if missing:
        raise UserError(where, f"missing field {missing[0]!r}")
    unknown = sorted(set(data) - set(LayerMask.__dataclass_fields__))
    if unknown:
        raise UserError(where, f"unknown field {unknown[0]!r}")
    types = field_types(LayerMask)
    mask = LayerMask(**{name: typed(value, types[name], f"{where}: field {name}", UserError) for name, value in data.items()})
    _check_mask(mask, where)
    if backbone is not None and not same_model(mask.backbone, backbone):
        raise UserError(
            f"{where}: made for backbone {mask.backbone!r}, but the config uses {backbone!r}; "
            f"retrain with --set model.backbone={mask.backbone} or search again for this backbone"
        )
    if num_layers is not None and mask.num_layers != num_layers:
        raise UserError(where, f"made for {mask.num_layers} layers, but the backbone has {num_layers}")
    return mask


def _check_mask(mask: LayerMask, where: str) -> None:
    """The fields of a mask agree with each other."""
    n = mask.num_layers
    if n < 1:
        raise UserError(where, f"field num_layers must be a positive integer, got {n!r}")
    if len(mask.mask) != n or any(v not in (0, 1) for v in mask.mask):
        raise UserError(where, f"field mask must be {n} values of 0/1, got {mask.mask}")
    if sorted(i for i, v in enumerate(mask.mask) if v) != sorted(mask.selected_layers):
        raise UserError(where, f"fields mask and selected_layers disagree ({mask.mask} vs {mask.selected_layers})")
    if not mask.selected_layers:
        raise UserError(where, "field selected_layers is empty")
    if not set(mask.candidate_layers) <= set(range(n)) or len(set(mask.candidate_layers)) != len(mask.candidate_layers):
        raise UserError(where, f"field candidate_layers must be distinct layers in 0..{n - 1}, got {mask.candidate_layers}")
    if not set(mask.selected_layers) <= set(mask.candidate_layers):
        raise UserError(where, f"selected_layers {mask.selected_layers} are not all in candidate_layers {mask.candidate_layers}")
    for name in ("scores", "spread", "gate_scores", "perturbation_scores"):  # one value per candidate layer
        values = getattr(mask, name)
        if values is not None and len(values) != len(mask.candidate_layers):
            raise UserError(where, f"field {name} has {len(values)} values for {len(mask.candidate_layers)} candidate layers")
    if mask.k != len(mask.selected_layers):
        raise UserError(where, f"field k={mask.k} but {len(mask.selected_layers)} layers are selected")
    for name, low in (("trainable_params", 0), ("prompt_length", 1), ("param_budget", 1)):  # counts
        value = getattr(mask, name)
        if value is not None and value < low:
            raise UserError(where, f"field {name} must be at least {low}, got {value}")
    if mask.spread is not None and min(mask.spread) < 0:
        raise UserError(where, f"field spread holds a negative value: {mask.spread}")


# ---------------------------------------------------------------------- gate history


GATES_HEADER = ["step", "epoch", "layer", "alpha"]


def read_gate_history(path: Path) -> list[dict[str, Any]]:
    """Rows of ``gates.csv`` as dicts with typed values; a damaged row names its line."""
    if not path.is_file():
        raise UserError(path.parent, f"no gate history ({path.name}); is it a finished or running search directory?")
    reader = csv.reader(io.StringIO(read_text(path, str(path)), newline=""))
    rows = []
    try:
        header = next(reader, None)
        if header != GATES_HEADER:
            raise UserError(path, f"header must be {','.join(GATES_HEADER)}, got {header}")
        for row in reader:
            if row:
                rows.append(gate_row(row, f"{path} line {reader.line_num}"))
    except csv.Error as exc:
        raise UserError(f"{path} line {reader.line_num}", f"not a valid gate row ({exc})") from None
    if not rows:
        raise UserError(path, "the gate history is empty; the search logged no step")
    return rows


def gate_row(row: list[str], where: str) -> dict[str, Any]:
    """One row of ``gates.csv`` with typed values; a damaged one is a :class:`UserError` for ``where``."""
    problem = f"not a valid gate row: {row}; the gate history is damaged (search again with --force)"
    if len(row) != len(GATES_HEADER):
        raise UserError(where, problem)
    try:
        step, epoch, layer, alpha = int(row[0]), int(row[1]), int(row[2]), float(row[3])
    except ValueError:
        raise UserError(where, problem) from None
    if min(step, epoch, layer) < 0 or not 0 <= alpha <= 1:  # a gate is a probability (NaN fails too)
        raise UserError(where, problem)
    return {"step": step, "epoch": epoch, "layer": layer, "alpha": alpha}


def gate_scores(rows: list[dict[str, Any]], candidates: list[int], average_last: int = 1) -> tuple[list[float], list[float]]:
    """Each candidate's gate averaged over the last ``average_last`` logged steps (0: every
    step logged in the last epoch), and its standard deviation over those steps."""
    if average_last == 0:
        last_epoch = max(r["epoch"] for r in rows)
        steps = sorted({r["step"] for r in rows if r["epoch"] == last_epoch and r["step"] > 0})
    else:
        steps = sorted({r["step"] for r in rows})[-average_last:]
    chosen = set(steps)
    by_layer: dict[int, list[float]] = {c: [] for c in candidates}
    for r in rows:
        if r["step"] in chosen and r["layer"] in by_layer:
            by_layer[r["layer"]].append(r["alpha"])
    missing = [c for c, v in by_layer.items() if not v]
    if missing:
        raise UserError("gates.csv", f"no gate values for layers {missing} in the last {average_last} logged steps")
    values = [by_layer[c] for c in candidates]
    means = [sum(v) / len(v) for v in values]
    spread = [(sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0 for v, m in zip(values, means)]
    return means, spread


def final_scores(rows: list[dict[str, Any]], candidates: list[int], average_last: int = 1) -> list[float]:
    """Each candidate's gate averaged over the last ``average_last`` logged steps."""
    return gate_scores(rows, candidates, average_last)[0]


def bootstrap_std(differences: list[list[float]], seed: int, draws: int = 200) -> list[float]:
    """Standard deviation of each row's mean over bootstrap resamples of its examples."""
    import random

    rng = random.Random(seed)
    n = len(differences[0])
    samples = [[rng.randrange(n) for _ in range(n)] for _ in range(draws)]
    spread = []
    for row in differences:
        means = [sum(row[i] for i in sample) / n for sample in samples]
        mean = sum(means) / draws
        spread.append((sum((m - mean) ** 2 for m in means) / (draws - 1)) ** 0.5)
    return spread


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def removal_ranking(candidates: list[int], full: list[float], without: list[list[float]], seed: int) -> Ranking:
    """Perturbation scores: the mean rise of the per-example dev loss when each candidate's
    prompt is removed from the supernet (``without[j]``: losses without ``candidates[j]``)."""
    differences = [[w - f for w, f in zip(row, full)] for row in without]
    scores = [_mean(d) for d in differences]
    ranking = Ranking.by_score("perturbation", candidates, scores, bootstrap_std(differences, seed), perturbation_scores=scores)
    rises = ", ".join(f"{layer} {scores[candidates.index(layer)]:+.4f}±{ranking.spread[candidates.index(layer)]:.4f}"
                      for layer in ranking.order)
    ranking.summary = f"dev loss {_mean(full):.4f} with every gate; removing a layer's prompt changes it by: {rises}"
    return ranking


def greedy_ranking(candidates: list[int], dev_loss: Callable[[list[int]], list[float]], seed: int,
                   rounds: int | None = None) -> Ranking:
    """Progressive selection with the chosen layers kept: each round adds the layer whose
    prompt lowers the mean dev loss most, for ``rounds`` rounds (default: every candidate).

    A chosen layer's score is the loss drop it brought in its round, its spread a bootstrap
    of that drop; a layer never chosen is scored by the drop it would have brought in the
    last round, so the last kept and the first dropped layer compare like for like. The
    ranking is the order of the rounds, then the rest by that last-round drop (scores of
    different rounds are not comparable)."""
    rounds = len(candidates) if rounds is None else max(1, min(rounds, len(candidates)))
    chosen: list[int] = []
    current = dev_loss([])
    path = [f"{_mean(current):.4f} with no prompt"]
    scores: dict[int, float] = {}
    spread: dict[int, float] = {}
    while len(chosen) < rounds:
        before = current
        trials = {c: dev_loss([*chosen, c]) for c in candidates if c not in chosen}
        best = min(trials, key=lambda c: (sum(trials[c]), c))
        for c, losses in trials.items():  # kept for the chosen layer; overwritten each round for the rest
            drop = [a - b for a, b in zip(before, losses)]
            scores[c], spread[c] = _mean(drop), bootstrap_std([drop], seed)[0]
        chosen.append(best)
        current = trials[best]
        path.append(f"+{best} {_mean(current):.4f}")
    rest = [c for c in candidates if c not in chosen]
    ranking = Ranking("greedy", [scores[c] for c in candidates], [spread[c] for c in candidates],
                      chosen + rank_layers(rest, [scores[c] for c in rest]))
    runner_up = ranking.order[rounds] if rest else None
    ranking.summary = "dev loss " + " -> ".join(path) + (
        f"; in round {rounds}, layer {runner_up} would have given {_mean(before) - scores[runner_up]:.4f}" if runner_up is not None else "")
    return ranking


def combined_ranking(candidates: list[int], gates: Ranking, removal: Ranking) -> Ranking:
    """The mean of each candidate's rank by gates and by perturbation (ties: the lower layer)."""
    position = {c: (gates.order.index(c) + removal.order.index(c)) / 2 for c in candidates}
    scores = [-position[c] for c in candidates]
    spread = [0.5 for _ in candidates]  # half a rank: a tie or a swap of neighbours is within it
    ranking = Ranking.by_score("combined", candidates, scores, spread,
                               gate_scores=gates.scores, perturbation_scores=removal.scores)
    ranking.summary = (f"mean rank by gates {gates.order} and by perturbation {removal.order}: "
                       + ", ".join(f"{c} {position[c] + 1:g}" for c in ranking.order))
    return ranking


def averaged_steps(average_last: int) -> str:
    """Which logged steps the gates' ranking averages (``select.average_last``), in words."""
    if average_last == 0:
        return "mean over the last epoch's logged steps"
    return "the last logged step" if average_last == 1 else f"mean over the last {average_last} logged steps"


def gates_summary(candidates: list[int], gates: Ranking, average_last: int) -> str:
    """The gates' ranking in words: which steps' gates it averages and their values, best first."""
    values = ", ".join(f"{layer} {gates.scores[candidates.index(layer)]:.3f}±{gates.spread[candidates.index(layer)]:.3f}"
                       for layer in gates.order)
    return f"gate alpha ({averaged_steps(average_last)}): {values}"
