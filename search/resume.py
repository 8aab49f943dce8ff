"""What a resumed training is checked against before it writes anything.

A checkpoint holds where its training stood (:class:`~search.trainer.TrainState`). To resume
from it, that position must be one the run's :class:`Plan` reaches (``epoch: 99`` would end
a search at once, as if finished), and the history files the training appends to
(``gates.csv``, ``steps.csv``, ``metrics.csv``) must hold every row logged up to it, each one
readable: a history emptied to its header, or a garbled row, would otherwise be cut there
silently and the run would finish with a hole in it. ``spt`` runs :func:`check_resume`
before it touches the run directory; the pipeline checks each training it resumes again
(an HPO trial retried in its own directory).
"""

from __future__ import annotations

import bisect
import csv
import functools
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spt.errors import UserError
from spt.files import read_text

from .callbacks import MetricHistory, StepHistory
from .checkpoint import CHECKPOINT_FILE, RETRAIN_CHECKPOINT_FILE, check_checkpoint, checkpoint_fix
from .schedule import steps_per_epoch
from .selection import GATES_HEADER, gate_row

if TYPE_CHECKING:
    from .config import RetrainConfig, RunConfig, SearchConfig
    from .pipeline import Prepared
    from .runs import RunDir
    from .trainer import TrainState


@dataclass(frozen=True)
class Plan:
    """The steps a training takes: ``epochs[e]`` in epoch ``e``, at most ``max_steps`` in all."""

    epochs: tuple[int, ...]
    max_steps: int | None = None

    @property
    def total(self) -> int:
        total = sum(self.epochs)
        return total if self.max_steps is None else min(total, self.max_steps)

    def ends(self) -> list[int]:
        """The step that ends each epoch."""
        return list(itertools.accumulate(self.epochs))

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that step ``step`` (counted from 1) belongs to; 0 for step 0."""
        return bisect.bisect_left(self._ends, step)  # the first epoch whose end is at or after ``step``

    @functools.cached_property
    def _ends(self) -> list[int]:
        return self.ends()  # (once: a history check asks for every logged step)


def search_plan(s: SearchConfig, n_train: int) -> Plan:
    """The search's steps: warm-up epochs over all of train, later ones over D1 (as :func:`search_schedule` draws them)."""
    return Plan(tuple(steps_per_epoch(n_train, s.batch_size, None if e < s.warmup else s.d1_fraction)
                      for e in range(s.epochs)), s.max_steps)


@dataclass(frozen=True)
class Training:
    """One resumable training: its ``stage`` (``search``, ``retrain``), :class:`Plan`, how often
    it logs a row of ``steps.csv`` (``every``), the run directory of its histories (None: it
    keeps none) and, for the search, the candidate layers of ``gates.csv``."""

    stage: str
    plan: Plan
    every: int
    folder: Path | None = None
    layers: tuple[int, ...] = ()

    def check(self, path: Path, state: TrainState) -> None:
        """Refuse the checkpoint at ``path`` (its ``state``) if this training cannot resume from it."""
        check_position(path, state, self)
        if self.folder is not None:
            check_histories(self, state)


def search_training(config: RunConfig, n_train: int, layers: list[int], folder: Path | None) -> Training:
    """The search over candidate ``layers``, logging gates and steps every ``search.log_every`` steps."""
    return Training("search", search_plan(config.search, n_train), config.search.log_every, folder, tuple(layers))


def plain_training(stage: str, settings: RetrainConfig, n_train: int, folder: Path | None) -> Training:
    """A training over all of train (the retraining), logging every step."""
    return Training(stage, Plan((steps_per_epoch(n_train, settings.batch_size),) * settings.epochs), 1, folder)


def check_resume(run: RunDir, prep: Prepared) -> None:
    """Before a resumed job writes anything: refuse its damaged checkpoints, a position beyond
    the run's plan, and histories cut or garbled before the checkpoint's step."""
    config, n_train = prep.config, len(prep.train)
    layers = config.prompt.candidates(prep.backbone.num_layers)
    trainings = {CHECKPOINT_FILE: search_training(config, n_train, layers, run.path),
                 RETRAIN_CHECKPOINT_FILE: plain_training("retrain", config.retrain, n_train, run.path)}
    for name, training in trainings.items():
        state = check_checkpoint(run.path / name)
        if state is not None:
            training.check(run.path / name, state)


def check_position(path: Path, state: TrainState, training: Training) -> None:
    """The checkpoint's epoch, batch and step are a position ``training`` reaches, and agree."""
    plan, where, fix = training.plan, f"checkpoint: {path}", checkpoint_fix(path)
    epochs, what = len(plan.epochs), f"this {training.stage}"
    if state.epoch > epochs:
        raise UserError(where, f"state.epoch: {state.epoch} is beyond {what}'s {epochs} epochs{fix}")
    length = plan.epochs[state.epoch] if state.epoch < epochs else 0
    if state.batch_in_epoch and state.batch_in_epoch >= length:
        raise UserError(where, f"state.batch_in_epoch: {state.batch_in_epoch} is beyond the {length} steps of epoch "
                        f"{state.epoch} of {what}{fix}")
    expected = sum(plan.epochs[: state.epoch]) + state.batch_in_epoch
    if state.step > plan.total:
        raise UserError(where, f"state.step: {state.step} is beyond {what}'s {plan.total} steps{fix}")
    if state.step != expected:
        raise UserError(where, f"state.step: {state.step} is not the step of epoch {state.epoch}, batch "
                        f"{state.batch_in_epoch} ({expected}) of {what}{fix}")


# ---------------------------------------------------------------------- histories

# A history row's stage, step and what identifies it (None: the row is garbled).
Row = tuple[str, int, tuple[int, ...]]


@dataclass(frozen=True)
class History:
    """A history file: its name, the columns its header starts with, how a row is read, and
    how a row is named in messages (``label`` formatted with what identifies it)."""

    name: str
    header: list[str]
    parse: Callable[[list[str]], Row | None]
    label: str


def check_histories(training: Training, state: TrainState) -> None:
    """Every history file ``training`` appends to holds every row logged up to ``state.step``
    (the rows it keeps when it resumes), in order, and none of its rows is garbled."""
    assert training.folder is not None
    plan, step = training.plan, state.step
    ends = set(plan.ends())
    if training.layers:  # the search's gates: step 0 holds the initial gates
        logged = [s for s in range(step + 1) if s % training.every == 0 or s in ends or s == plan.total]
        _compare(GATES, training, step, [(s, plan.epoch_of(s), layer) for s in logged for layer in training.layers])
    logged = [s for s in range(1, step + 1) if s % training.every == 0 or s in ends or (state.stop and s == step)]
    _compare(STEPS, training, step, [(s, plan.epoch_of(s) + 1) for s in logged])
    epochs = [(e + 1, end) for e, end in enumerate(plan.ends()[: state.epoch])]
    if state.stop and state.batch_in_epoch:  # stopped within an epoch: that epoch's row so far
        epochs.append((state.epoch + 1, step))
    _compare(METRICS, training, step, epochs)


def _gate_row(row: list[str]) -> Row | None:
    try:
        parsed = gate_row(row, "")
    except UserError:
        return None
    return "search", parsed["step"], (parsed["step"], parsed["epoch"], parsed["layer"])


def _steps_row(row: list[str]) -> Row | None:
    """``steps.csv``: stage, step, epoch, then losses and learning rates (numbers or empty)."""
    if len(row) != len(StepHistory.COLUMNS) or not all(c.isdigit() for c in row[1:3]) or not _numbers(row[3:]):
        return None
    return row[0], int(row[1]), (int(row[1]), int(row[2]))


def _metrics_row(row: list[str]) -> Row | None:
    """``metrics.csv``: stage, epoch, step, then numbers (or empty) but for the dev metric's name."""
    if len(row) < len(MetricHistory.COLUMNS) or not all(c.isdigit() for c in row[1:3]) or not _numbers(row[3:7] + row[8:]):
        return None
    return row[0], int(row[2]), (int(row[1]), int(row[2]))


def _numbers(cells: list[str]) -> bool:
    try:
        [float(c) for c in cells if c != ""]
    except ValueError:
        return False
    return True


GATES = History("gates.csv", GATES_HEADER, _gate_row, "step {}, epoch {}, layer {}")
STEPS = History("steps.csv", StepHistory.COLUMNS, _steps_row, "step {}, epoch {}")
METRICS = History("metrics.csv", MetricHistory.COLUMNS, _metrics_row, "epoch {}, step {}")


def _compare(history: History, training: Training, step: int, expected: list[tuple[int, ...]]) -> None:
    """Refuse a history whose rows of ``training`` up to ``step`` are not the ``expected`` ones
    (naming the first missing), that is missing, or that holds a garbled row (naming its line)."""
    assert training.folder is not None
    path = training.folder / history.name
    fix = f"; to resume from the checkpoint at step {step}, the history up to it must be whole: start the {training.stage} over with --force"
    if not path.is_file():
        raise UserError(str(path), f"missing{fix}")
    rows = list(csv.reader(io.StringIO(read_text(path, str(path)), newline="")))
    if not rows or rows[0][: len(history.header)] != history.header:
        raise UserError(f"{path} line 1", f"the header must start with {','.join(history.header)}{fix}")
    found = []
    for line, row in enumerate(rows[1:], start=2):
        parsed = history.parse(row) if row else ("", 0, ())  # (a blank line, which the readers skip)
        if parsed is None:
            raise UserError(f"{path} line {line}", f"not a valid row: {','.join(row)}{fix}")
        if parsed[0] == training.stage and parsed[1] <= step:
            found.append(parsed[2])
    for i, want in enumerate(expected):
        if i >= len(found) or found[i] != want:
            raise UserError(str(path), f"the row of {history.label.format(*want)} is missing{fix}")
    if len(found) > len(expected):
        raise UserError(str(path), f"an unexpected row of {history.label.format(*found[len(expected)])}{fix}")
