"""One trainer for the supernet search, the sparse model and every baseline.

:meth:`Trainer.fit` runs a schedule of steps. Each step updates the weights ``omega``
(generators and head, or a baseline's parameters) on a D1 batch; in search epochs the
model's :class:`~search.architect.Architect` then updates the gate logits on a D2 batch.
What happens around the steps (gate history, checkpoints, dev evaluation and best
weights, progress, metric history, stopping) is done by callbacks
(:mod:`search.callbacks`). The batches come from the model's :class:`~search.feed.Feed`;
evaluation is the :class:`~search.evaluator.Evaluator`'s.

Every step reseeds torch from ``(seed, step)`` (see :mod:`search.schedule`), so a run
resumed from a checkpoint takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from spt.trainable import TrainableModel

from . import distributed
from .architect import Architect
from .config import RetrainConfig, SearchConfig
from .feed import Feed
from .losses import TaskLoss, task_loss
from .schedule import ScheduledStep, lr_factor, step_seed
from .steps import apply_gradients, compiled, held_still, scaled


@dataclass
class TrainState:
    """Where training stands: enough to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0  # training time so far, across resumptions
    stop: bool = False  # set by a callback to end training early

    def advance(self, step: ScheduledStep) -> None:
        self.step += 1
        self.batch_in_epoch = step.index + 1
        if step.last:
            self.epoch, self.batch_in_epoch = step.epoch + 1, 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Callback:
    """Hooks around :meth:`Trainer.fit`; ``stats`` hold detached tensors (read them only when needed).

    A callback whose state a resumed run needs (the dev-best weights, an epoch's loss sums)
    returns it from :meth:`checkpoint_state`, which the checkpoint saves and hands back to
    :meth:`restore` before a resumed fit starts.
    """

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None: ...

    def on_step_end(self, trainer: Trainer, state: TrainState, step: ScheduledStep, stats: dict[str, torch.Tensor]) -> None: ...

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None: ...

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON-able values to save in a checkpoint (default: nothing)."""
        return {}, {}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Take back what :meth:`checkpoint_state` returned, from a checkpoint."""


class Trainer:
    """The model's weight optimizer, its architect (supernets), loss scalers and the weight step.

    ``settings`` is the config section that trains the model (``search`` or ``retrain``,
    or a copy with another learning rate for a baseline): ``lr``, ``weight_decay`` and
    ``grad_clip`` are read from it, and a supernet's architect reads the ``arch_*`` fields.
    ``feed`` makes the model's batches (:class:`~search.feed.Feed`: the train split, the
    device, the precision, the kept frozen states).
    """

    def __init__(
        self, model: TrainableModel, settings: SearchConfig | RetrainConfig, feed: Feed, seed: int,
        loss: TaskLoss = task_loss, fused_optimizer: bool | None = None, compile_step: bool = False,
        total_steps: int | None = None,
    ) -> None:
        if feed.model is not model:
            raise ValueError("the feed makes the batches of another model")
        self.model, self.settings, self.feed, self.seed, self.loss = model, settings, feed, seed, loss
        self.device = feed.device
        self.compute_loss = compiled(loss, self.device) if compile_step and loss.compilable else loss
        self.weights = model.weight_parameters()
        # Fused on GPUs: one kernel for all parameters. (The CPU keeps the reference implementation,
        # whose rounding the stored reference results were made with.)
        fused = self.device.type == "cuda" if fused_optimizer is None else fused_optimizer
        # (None for a model with nothing to train.)
        self.optimizer = torch.optim.AdamW(self.weights, lr=settings.lr, weight_decay=settings.weight_decay,
                                           fused=fused) if self.weights else None
        self.scaler = feed.precision.scaler(self.device) if self.optimizer is not None else None  # (fp16)
        self.architect = (Architect(model, settings, feed, seed, fused, compile_step)
                          if model.architecture_parameters() else None)
        self.total_steps = total_steps  # for learning-rate schedules
        self.accumulate = settings.gradient_accumulation_steps
        distributed.broadcast_parameters(self.weights + self.gates)

    @property
    def gates(self) -> list[nn.Parameter]:
        """The architecture parameters (a supernet's gate logits; none for other models)."""
        return self.architect.params if self.architect is not None else []

    # ------------------------------------------------------------------ the loop

    def fit(self, steps: Iterable[ScheduledStep], callbacks: list[Callback], state: TrainState | None = None) -> TrainState:
        """Run ``steps`` from ``state`` (a fresh start by default); the bi-level loop of SPT-DARTS."""
        state = state or TrainState()
        for callback in callbacks:
            callback.on_fit_start(self, state)
        for step in steps:
            if state.stop:
                break
            started = time.perf_counter()
            self.schedule_learning_rates(state.step)
            update = (state.step + 1) % self.accumulate == 0 or step.last
            stats = self.weight_step(step.omega, state.step, update)
            if step.arch is not None and self.architect is not None:
                stats.update(self.architect.step(step.arch, state.step))
            state.advance(step)
            state.seconds += time.perf_counter() - started
            for callback in callbacks:
                callback.on_step_end(self, state, step, stats)
        for callback in callbacks:
            callback.on_fit_end(self, state)
        return state

    # ------------------------------------------------------------------ steps

    def schedule_learning_rates(self, step: int) -> None:
        """Set the weights' and the gates' learning rates for ``step`` (``lr_scheduler``, ``warmup_ratio``)."""
        s = self.settings
        if self.total_steps is None or (s.lr_scheduler == "constant" and s.warmup_ratio == 0):
            return
        factor = lr_factor(step, self.total_steps, s.lr_scheduler, s.warmup_ratio)
        optimizers = [(self.optimizer, s.lr)] + ([(self.architect.optimizer, s.arch_lr)] if self.architect else [])
        for optimizer, base in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = base * factor

    def learning_rates(self) -> list[float | None]:
        """The weights' and the gates' current learning rates (None: no gates trained)."""
        return [self.optimizer.param_groups[0]["lr"], self.architect.optimizer.param_groups[0]["lr"] if self.architect else None]

    def weight_step(self, indices: list[int], step: int, update: bool = True) -> dict[str, torch.Tensor]:
        """The weights' step on the global batch ``indices`` (this rank's share under torchrun):
        gradients of its loss, and (``update``) the optimizer step on what has accumulated."""
        torch.manual_seed(step_seed(self.seed, step, stream=1))
        self.model.train()
        batch, scale = self.feed.local_batch(indices)
        stats: dict[str, torch.Tensor] = {}
        if batch is not None:  # a rank whose share of a small last batch is empty only joins the all-reduce
            inputs = self.loss.inputs(step)
            with held_still(self.gates):
                with self.feed.autocast():
                    terms = self.compute_loss(self.model, batch, *inputs)
                weight = scale / self.accumulate
                loss = terms["loss"] if weight == 1 else terms["loss"] * weight  # (x 1: two kernels for nothing)
                scaled(loss, self.scaler).backward()
            stats = {k: v.detach() for k, v in terms.items()}
        if update:
            apply_gradients(self.optimizer, self.weights, self.settings.grad_clip, self.scaler)
        return stats

    # ------------------------------------------------------------------ state

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers a checkpoint saves, by name."""
        opts = {"omega": self.optimizer} if self.optimizer is not None else {}
        if self.architect is not None:
            opts["arch"] = self.architect.optimizer
        return opts

    @property
    def scalers(self) -> dict[str, torch.amp.GradScaler]:
        """The loss scalers a checkpoint saves (fp16), by the name of their optimizer: one each, with its
        own scale (a gate step between two accumulated weight batches must not rescale the weight gradients)."""
        named = {"omega": self.scaler, "arch": self.architect.scaler if self.architect is not None else None}
        return {name: scaler for name, scaler in named.items() if scaler is not None}
