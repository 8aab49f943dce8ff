"""What happens around the training steps, as :class:`~search.trainer.Callback` objects.

* :class:`StepLimit` - stop after a number of steps;
* :class:`GateHistory` - ``gates.csv``, one row per logged step and candidate layer;
* :class:`FiniteCheck` - stop a diverging run (NaN or infinite loss or gates);
* :class:`Checkpointer` - the resumable checkpoint;
* :class:`DevEvaluator` - dev evaluations, the dev-best weights, early stopping, pruning hooks;
* :class:`Progress` - a progress bar on a terminal, a line per 10% otherwise;
* :class:`MetricHistory` - ``metrics.csv``, a log line per epoch, TensorBoard scalars;
* :class:`StepHistory` - ``steps.csv``, the losses and learning rates of the steps, TensorBoard scalars.

Callbacks that keep state a resumed run needs give it to the :class:`Checkpointer`, which
is placed after them (a checkpoint at step ``n`` holds what they did at step ``n``).
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from spt.errors import UserError
from spt.files import append_text, read_text, write_text_atomic

from . import distributed
from .checkpoint import save_checkpoint
from .progress import WorkProgress
from .schedule import ScheduledStep
from .selection import GATES_HEADER
from .trainer import Callback, Trainer, TrainState

logger = logging.getLogger("spt")


class StepLimit(Callback):
    """Stop once ``total`` steps are done (a resumed run past it takes no step)."""

    def __init__(self, total: int) -> None:
        self.total = total

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        state.stop = state.step >= self.total

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        if state.step >= self.total:
            state.stop = True


class GateHistory(Callback):
    """``gates.csv`` (step, epoch, layer, alpha), written as it goes; step 0 holds the initial gates.

    On resume the rows logged after the checkpoint's step are dropped: the resumed run
    logs them again. A history that vanished (deleted while the search ran, or before it
    resumed) stops the search with a :class:`UserError`: rows are never silently lost.
    """

    def __init__(self, path: Path, layers: list[int], log_every: int, total: int) -> None:
        self.path, self.layers, self.log_every, self.total = path, layers, log_every, total

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        if state.step == 0:
            write_text_atomic(self.path, ",".join(GATES_HEADER) + "\n")
            self._write(0, 0, trainer.model.alphas())
            return
        if not self.path.is_file():
            raise UserError("gates.csv", f"{self.path} is missing, but the search resumes from step {state.step}: the gate "
                            "history before that step is lost; start the search over with --force")
        rows = list(csv.reader(io.StringIO(read_text(self.path, str(self.path)), newline="")))[1:]
        kept = [r for r in rows if r and r[0].isdigit() and int(r[0]) <= state.step]
        write_text_atomic(self.path, "".join(",".join(r) + "\n" for r in [GATES_HEADER, *kept]))

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        if state.step % self.log_every == 0 or step.last or state.step == self.total:
            self._write(state.step, step.epoch, trainer.model.alphas())

    def _write(self, step: int, epoch: int, alphas: torch.Tensor) -> None:
        rows = [[step, epoch, layer, f"{alpha:.6f}"] for layer, alpha in zip(self.layers, alphas.tolist())]
        try:
            append_text(self.path, csv_text(rows), create=False)  # a vanished file is not recreated
        except FileNotFoundError:
            raise UserError("gates.csv", f"{self.path} was deleted while the search ran (before step {step}); the gate "
                            "history is lost: start the search over with --force") from None


class TrainingDiverged(UserError):
    """The loss or the gates stopped being finite numbers."""


class FiniteCheck(Callback):
    """Stop training with :class:`TrainingDiverged` once the loss or the gates are NaN or infinite.

    Every step folds ``isfinite(loss)`` into a flag on the device, which costs no host-device
    sync; the flag and the gates are read only at the steps that read the device anyway
    (steps divisible by one of ``periods``: gates logged, a checkpoint or a dev evaluation
    due; and the last step of each epoch). Placed before those callbacks, it stops the run
    before anything non-finite is logged, saved or kept.
    """

    def __init__(self, section: str, periods: tuple[int, ...], total: int) -> None:
        self.section, self.periods, self.total = section, tuple(p for p in periods if p), total
        self.flag: torch.Tensor | None = None
        self.checked = 0

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self.flag, self.checked = None, state.step

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        loss = stats.get("loss")
        if loss is not None:
            bad = ~torch.isfinite(loss).all()
            self.flag = bad if self.flag is None else self.flag | bad
        if not (step.last or state.step == self.total or any(state.step % p == 0 for p in self.periods)):
            return
        checks = [] if self.flag is None else [self.flag]
        if trainer.architect is not None:
            checks += [~torch.isfinite(p.detach()).all() for p in trainer.architect.params]
        # Every rank joins (a rank without a share of these batches too): the ranks stop together.
        bad = torch.stack(checks).any() if checks else torch.zeros((), dtype=torch.bool, device=trainer.device)
        if distributed.any_rank(bad):
            lrs = f"{self.section}.lr" + (" or search.arch_lr" if trainer.architect is not None else "")
            raise TrainingDiverged(
                self.section, f"training diverged at step {state.step}: the loss or the gates are NaN or infinite "
                f"(finite at step {self.checked}); lower {lrs} (or set {self.section}.grad_clip) and start over with --force"
            )
        self.flag, self.checked = None, state.step


class Checkpointer(Callback):
    """Save a resumable checkpoint every ``every`` steps (0: none but these), at each epoch
    end and when training stops early; with it the state of the named ``callbacks`` and
    ``identity`` (see :func:`~search.checkpoint.save_checkpoint`)."""

    def __init__(self, path: Path, every: int, callbacks: dict[str, Callback] | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        self.path, self.every, self.callbacks, self.identity = path, every, callbacks or {}, identity

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        # Only where no gradient is waiting to be accumulated: a checkpoint holds no gradients.
        due = self.every and state.step % self.every == 0 and state.step % trainer.accumulate == 0
        if due or step.last or state.stop:
            save_checkpoint(self.path, trainer, state, self.callbacks, self.identity)


class DevEvaluator(Callback):
    """Evaluate on dev every ``every`` steps (0: at each epoch end) and at the last step;
    keep the dev-best weights and put them back at the end. ``evaluate()`` gives the dev
    scores (the pipeline's :class:`~search.evaluator.Evaluator`, on the trainer's feed).

    ``on_eval(step, score)`` is called after each evaluation (Optuna pruning hooks in
    here); with ``patience`` set, training stops after that many evaluations without a
    better score. A resumed run gets back the scores, the dev-best weights and the patience
    count from the checkpoint, and calls ``on_eval`` again for the scores before it (a
    retried Optuna trial is a new trial: it needs them to be pruned as the first would be).
    """

    def __init__(
        self, evaluate: Callable[[], dict[str, float]], metric: str, every: int, total: int,
        on_eval: Callable[[int, float], None] | None = None, patience: int | None = None,
    ) -> None:
        self.evaluate, self.metric, self.every, self.total = evaluate, metric, every, total
        self.on_eval, self.patience = on_eval, patience
        self.best: dict[str, Any] = {"score": None, "step": 0, "dev": None, "state": None}
        self.last_score = float("nan")
        self.scores_by_step: dict[int, float] = {}
        self.stale = 0

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        due = state.step % self.every == 0 if self.every else step.last
        if not (due or state.step == self.total):
            return
        dev = self.evaluate()
        score = self.last_score = self.scores_by_step[state.step] = dev[self.metric]
        if self.best["score"] is None or score > self.best["score"]:
            weights = {k: v.detach().clone() for k, v in trainer.model.trainable_state_dict().items()}
            self.best.update(score=score, step=state.step, dev=dev, state=weights)
            self.stale = 0
        else:
            self.stale += 1
        if self.on_eval is not None:
            self.on_eval(state.step, score)
        if self.patience is not None and self.stale >= self.patience:
            logger.info("early stop at step %d: no better dev %s in %d evaluations", state.step, self.metric, self.stale)
            state.stop = True

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        if self.on_eval is not None:
            for step in sorted(self.scores_by_step):
                self.on_eval(step, self.scores_by_step[step])

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        if self.best["state"] is not None:
            trainer.model.load_state_dict(self.best["state"], strict=False)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        best = {k: v for k, v in self.best.items() if k != "state"}
        scores = {str(k): v for k, v in self.scores_by_step.items()}
        return dict(self.best["state"] or {}), {"best": best, "last_score": self.last_score, "scores": scores, "stale": self.stale}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.best = {**values["best"], "state": tensors or None}
        self.last_score, self.stale = values["last_score"], values["stale"]
        self.scores_by_step = {int(k): v for k, v in values["scores"].items()}


class Progress(Callback):
    """Training steps on a :class:`~search.progress.WorkProgress` display (a bar on a terminal,
    one line per 10% otherwise), from the step a resumed run starts at.

    ``describe(trainer, state, step, loss)`` gives the text after the bar; ``loss`` is the
    smoothed weight-step loss. Values are read from the device only when the text is shown.
    """

    def __init__(self, total: int, desc: str, describe: Callable[[Trainer, TrainState, ScheduledStep, float], str],
                 enabled: bool = True, refresh: int = 1) -> None:
        self.total, self.desc, self.describe, self.enabled, self.refresh = total, desc, describe, enabled, refresh
        self.smooth: torch.Tensor | None = None
        self.meter: WorkProgress | None = None

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        self.meter = WorkProgress(self.total, self.desc, "step", "steps", self.enabled, initial=state.step,
                                  clock=lambda: state.seconds)  # the run's seconds, resumed parts included

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        loss = stats.get("loss")  # absent on a rank whose share of the batch was empty
        if loss is not None:
            self.smooth = loss if self.smooth is None else 0.9 * self.smooth + 0.1 * loss
        if self.meter is not None:
            shown = state.step % self.refresh == 0 or step.last or state.step == self.total
            self.meter.advance(lambda: self.describe(trainer, state, step, self._loss()), shown)

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        if self.meter is not None:
            self.meter.close()

    def _loss(self) -> float:
        return math.nan if self.smooth is None else float(self.smooth)


class MetricHistory(Callback):
    """``metrics.csv``: one row per epoch of a stage (``search`` or ``retrain``): mean losses,
    the dev score when one was measured, learning rates and the gates; the same line in the
    log (console and ``log.txt``) and, with a TensorBoard writer, as scalars.

    Step losses stay on the device and are summed there; they are read once per epoch. A
    checkpoint keeps the epoch's sums so far, so a resumed epoch's means are those of an
    uninterrupted one.
    """

    COLUMNS = ["stage", "epoch", "step", "seconds", "train_loss", "arch_loss", "consistency", "dev_metric", "dev", "lr", "arch_lr"]

    def __init__(self, path: Path, stage: str, gate_layers: list[int], epochs: int,
                 dev: DevEvaluator | None = None, tensorboard: Any = None) -> None:
        self.path, self.stage, self.gate_layers, self.epochs = path, stage, gate_layers, epochs
        self.dev, self.tensorboard = dev, tensorboard
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def header(self) -> list[str]:
        return self.COLUMNS + [f"gate_{layer}" for layer in self.gate_layers]

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        kept: list[list[str]] = []
        if self.path.is_file():  # keep other stages' rows, and this stage's up to a resumed step
            rows = list(csv.reader(io.StringIO(read_text(self.path, str(self.path)), newline="")))[1:]
            kept = [r for r in rows if r and (r[0] != self.stage or (len(r) > 2 and r[2].isdigit() and int(r[2]) <= state.step))]
        text = "".join(",".join(r) + "\n" for r in [self.header(), *kept])
        write_text_atomic(self.path, text)
        self.sums = {k: v.to(trainer.device) for k, v in self.sums.items()}

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        for name in ("loss", "arch_loss", "consistency"):
            if name in stats:
                self.sums[name] = self.sums.get(name, 0) + stats[name]
                self.counts[name] = self.counts.get(name, 0) + 1
        if step.last or state.stop:
            self._write(trainer, state, step.epoch)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return dict(self.sums), {"counts": self.counts}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.sums, self.counts = dict(tensors), dict(values["counts"])  # (to the device when the fit starts)

    def _write(self, trainer: Trainer, state: TrainState, epoch: int) -> None:
        means = {k: float(v) / self.counts[k] for k, v in self.sums.items()}
        self.sums, self.counts = {}, {}
        dev = self.dev.scores_by_step.get(state.step) if self.dev is not None else None
        gates = trainer.model.alphas().tolist() if hasattr(trainer.model, "alphas") else []
        lrs = trainer.learning_rates()
        row = [self.stage, epoch + 1, state.step, round(state.seconds, 3), *(_cell(means.get(k)) for k in ("loss", "arch_loss", "consistency")),
               self.dev.metric if dev is not None else "", _cell(dev), *(_cell(x) for x in lrs), *(_cell(g) for g in gates)]
        append_text(self.path, csv_text([row]))  # all or nothing: a full disk leaves no half row
        text = ", ".join(f"{k} {v:.4f}" for k, v in means.items())
        if dev is not None:
            text += f", dev {self.dev.metric} {dev:.4f}"
        if gates:
            text += ", gates " + " ".join(f"{g:.2f}" for g in gates)
        logger.info("%s epoch %d/%d (step %d, %.0fs): %s", self.stage, epoch + 1, self.epochs, state.step, state.seconds, text)
        if self.tensorboard is not None:
            scalars = {f"{self.stage}/{k}": v for k, v in means.items()}
            scalars.update({f"{self.stage}/dev_{self.dev.metric}": dev} if dev is not None else {})
            scalars.update({f"{self.stage}/gate_{layer}": g for layer, g in zip(self.gate_layers, gates)})
            scalars[f"{self.stage}/lr"] = lrs[0]
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, epoch + 1)
            self.tensorboard.flush()


class StepHistory(Callback):
    """``steps.csv``: a row per ``every``-th step of a stage (and per epoch's last step):
    ``stage, step, epoch`` (counted from 1, as in ``metrics.csv``), the step's weight loss,
    gate loss and consistency term (those it has; under torchrun rank 0's share), and the
    learning rates it ran with; with ``tensorboard`` (a folder), the same as scalars
    ``<stage>/step_<column>`` over steps.

    Reading a loss is a host-device sync, so losses stay on the device until written: rows
    are written at each epoch end, when training stops, and at each checkpoint (the
    :class:`Checkpointer` asks this callback for its state), with one read of the device
    for all waiting rows; ``every`` bounds the rows and the losses waiting on the device. A
    resumed run drops the rows after its checkpoint's step and logs them again, so each
    step is in the file once; TensorBoard hides the earlier run's later points (``purge_step``).
    """

    COLUMNS = ["stage", "step", "epoch", "loss", "arch_loss", "consistency", "lr", "arch_lr"]
    TERMS = ("loss", "arch_loss", "consistency")

    def __init__(self, path: Path, stage: str, every: int, tensorboard: Path | None = None) -> None:
        self.path, self.stage, self.every, self.tensorboard = path, stage, every, tensorboard
        self.pending: list[tuple[int, int, list[torch.Tensor | None], list[float | None]]] = []
        self.writer: Any = None

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        kept: list[list[str]] = []
        if self.path.is_file():  # other stages' rows, and this stage's up to a resumed step
            rows = list(csv.reader(io.StringIO(read_text(self.path, str(self.path)), newline="")))[1:]
            kept = [r for r in rows if len(r) > 1 and (r[0] != self.stage or (r[1].isdigit() and int(r[1]) <= state.step))]
        write_text_atomic(self.path, "".join(",".join(r) + "\n" for r in [self.COLUMNS, *kept]))
        if self.tensorboard is not None:
            self.writer = tensorboard_writer(self.tensorboard, purge_step=state.step + 1 if state.step else None)

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict) -> None:
        if state.step % self.every == 0 or step.last or state.stop:
            lrs = trainer.learning_rates()
            self.pending.append((state.step, step.epoch + 1, [stats.get(k) for k in self.TERMS], lrs))
        if step.last or state.stop:
            self.flush()

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.flush()  # the file holds every logged step up to the checkpoint's
        return {}, {}

    def flush(self) -> None:
        """Write the waiting rows (one read of the device for all their losses)."""
        if not self.pending:
            return
        losses = [t.float() for _, _, terms, _ in self.pending for t in terms if t is not None]
        values = iter(torch.stack(losses).tolist() if losses else [])
        rows = [(step, epoch, [None if t is None else next(values) for t in terms], lrs) for step, epoch, terms, lrs in self.pending]
        self.pending = []
        append_text(self.path, csv_text([self.stage, step, epoch, *(_cell(x) for x in terms + lrs)] for step, epoch, terms, lrs in rows))
        if self.writer is not None:
            for step, _, terms, lrs in rows:
                for name, value in zip(self.COLUMNS[3:], terms + lrs):
                    if value is not None:
                        self.writer.add_scalar(f"{self.stage}/step_{name}", value, step)
            self.writer.flush()


def csv_text(rows: Iterable[Iterable[Any]]) -> str:
    """``rows`` as CSV text (``\r\n`` line ends, as ``csv.writer`` writes a file)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def tensorboard_writer(directory: Path, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` (``runtime.tensorboard``); needs the ``tensorboard`` package.
    ``purge_step``: a resumed run's first step; TensorBoard hides the earlier run's points from there on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("runtime.tensorboard", "needs the tensorboard package: pip install 'tensorboard>=2.14' (the track extra of spt-search)") from None
    return SummaryWriter(log_dir=str(directory), purge_step=purge_step)
