"""One trainer for the supernet search and for sparse-model training.

* ``omega`` steps train generators and head (the supernet's with the architecture-
  consistency loss: a sampled Bernoulli mask, a masked and a full pass of the same batch,
  ``beta * MSE`` between their representations);
* ``arch`` steps train the gate logits on D2 batches with ``omega`` fixed.

Every step reseeds torch from ``(seed, step)`` and every epoch's order comes from
``(seed, epoch)``, so a run resumed from a checkpoint takes exactly the steps an
uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from spt.gates import sample_architecture_mask
from spt.model import PromptModel, PromptSupernet

from . import distributed
from .batches import EncodedSplit, batch_indices, collate
from .metrics import compute_metrics


@dataclass
class OptimSettings:
    """Optimisation settings shared by the search and retraining."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    arch_lr: float = 5e-2
    arch_weight_decay: float = 0.0
    consistency_weight: float = 1.0
    mask_prob: float = 0.5


@dataclass
class TrainState:
    """Where training stands: enough to resume exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float | None = None
    extra: dict = field(default_factory=dict)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed for each (seed, step, stream)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(step_seed(seed, epoch, stream=17)).shuffle(order)
    return order


class Trainer:
    """Holds the model, its optimizers and the step functions."""

    def __init__(
        self, model: PromptModel, settings: OptimSettings, seed: int, device: torch.device | str = "cpu",
        precision: str = "fp32",
    ) -> None:
        self.model = model.to(device)
        self.settings = settings
        self.seed = seed
        self.device = torch.device(device)
        self.precision = precision
        self.omega_params = model.weight_parameters()
        self.omega_opt = torch.optim.AdamW(self.omega_params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.is_supernet = isinstance(model, PromptSupernet)
        self.arch_params: list[nn.Parameter] = model.architecture_parameters() if self.is_supernet else []
        self.arch_opt = (
            torch.optim.Adam(self.arch_params, lr=settings.arch_lr, betas=(0.5, 0.999), weight_decay=settings.arch_weight_decay)
            if self.is_supernet
            else None
        )
        distributed.broadcast_parameters(self.omega_params + self.arch_params)

    # ------------------------------------------------------------------ steps

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for forward passes when asked; weights and optimizer stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @contextlib.contextmanager
    def _only_train(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Let autograd compute weight gradients only for ``params`` (inputs still get theirs)."""
        chosen = {id(p) for p in params}
        others = [p for p in self.omega_params + self.arch_params if id(p) not in chosen]
        for p in others:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in others:
                p.requires_grad_(True)

    def _clip_and_step(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
        distributed.average_gradients(params)  # no-op in a single process
        norm = 0.0
        if self.settings.grad_clip > 0:
            norm = float(nn.utils.clip_grad_norm_(params, self.settings.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def train_omega(self, split: EncodedSplit, indices: list[int], step: int) -> dict[str, float]:
        """An omega step on the global batch ``indices`` (this rank's share of it under torchrun)."""
        local = distributed.shard(indices)
        batch = collate(split, local, self.device) if local else None
        return self.omega_step(batch, step, distributed.loss_scale(len(local), len(indices)))

    def train_arch(self, split: EncodedSplit, indices: list[int], step: int) -> dict[str, float]:
        """A gate step on the global batch ``indices`` (this rank's share of it under torchrun)."""
        local = distributed.shard(indices)
        batch = collate(split, local, self.device) if local else None
        return self.arch_step(batch, step, distributed.loss_scale(len(local), len(indices)))

    def omega_step(self, batch: dict[str, torch.Tensor] | None, step: int, scale: float = 1.0) -> dict[str, float]:
        """One generator/head update; the supernet's with the consistency loss.

        ``scale`` weights this process's loss by its share of the global batch; ``batch``
        is None for a rank whose share of a small last batch is empty.
        """
        torch.manual_seed(step_seed(self.seed, step, stream=1))
        self.model.train()
        stats = {"loss": float("nan"), "task_loss": float("nan"), "consistency": float("nan")}
        if batch is not None:
            with self._only_train(self.omega_params), self._autocast():
                stats = self._omega_loss(batch, step, scale)
        self._clip_and_step(self.omega_opt, self.omega_params)
        return stats

    def _omega_loss(self, batch: dict[str, torch.Tensor], step: int, scale: float) -> dict[str, float]:
        labels = batch["labels"]
        beta = self.settings.consistency_weight
        if self.is_supernet and beta > 0:
            gen = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
            mask = sample_architecture_mask(len(self.model.candidate_layers), self.settings.mask_prob, gen)
            full, masked = self.model.forward_consistency(batch, mask)
            task_loss = nn.functional.cross_entropy(full.logits.float(), labels)
            consistency = nn.functional.mse_loss(masked.representation.float(), full.representation.float())
            loss = task_loss + beta * consistency
        else:
            task_loss = nn.functional.cross_entropy(self.model(batch).logits.float(), labels)
            consistency = torch.zeros(())
            loss = task_loss
        (loss * scale).backward()
        return {"loss": loss.item(), "task_loss": task_loss.item(), "consistency": consistency.item()}

    def arch_step(self, batch: dict[str, torch.Tensor] | None, step: int, scale: float = 1.0) -> dict[str, float]:
        """One gate-logit update on a D2 batch, generators and head fixed."""
        torch.manual_seed(step_seed(self.seed, step, stream=3))
        self.model.train()
        arch_loss = float("nan")
        if batch is not None:
            with self._only_train(self.arch_params), self._autocast():
                loss = nn.functional.cross_entropy(self.model(batch).logits.float(), batch["labels"])
                (loss * scale).backward()
            arch_loss = loss.item()
        self._clip_and_step(self.arch_opt, self.arch_params)
        return {"arch_loss": arch_loss}

    # ------------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def predict(self, split: EncodedSplit, batch_size: int) -> tuple[list[int], float]:
        """Predicted label indices and mean cross-entropy over ``split`` (shared out across ranks)."""
        self.model.eval()
        mine = distributed.shard(range(len(split)))
        local: list[tuple[int, int, float]] = []
        for indices in batch_indices(mine, batch_size):
            batch = collate(split, indices, self.device)
            with self._autocast():
                logits = self.model(batch).logits.float()
            losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none").tolist()
            local.extend(zip(indices, logits.argmax(-1).tolist(), losses))
        results = sorted(distributed.gather_objects(local))
        return [r[1] for r in results], sum(r[2] for r in results) / max(1, len(split))

    def evaluate(self, split: EncodedSplit, batch_size: int, metric: str, positive_index: int | None = None) -> dict[str, float]:
        predictions, loss = self.predict(split, batch_size)
        scores = compute_metrics(split.labels, predictions, metric, positive_index)
        scores["loss"] = loss
        scores["n"] = len(split)
        return scores

    # ------------------------------------------------------------------ state

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"omega": self.omega_opt}
        if self.arch_opt is not None:
            opts["arch"] = self.arch_opt
        return opts


# ---------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class ScheduledStep:
    """One step of a schedule: a D1 (omega) batch and, in search epochs, a D2 (arch) batch."""

    epoch: int
    index: int  # position within the epoch
    omega: list[int]
    arch: list[int] | None
    last: bool  # the epoch's final step


def search_schedule(n_train: int, epochs: int, warmup_epochs: int, batch_size: int, d1_fraction: float, seed: int, epoch: int) -> list[ScheduledStep]:
    """The steps of one search epoch: warm-up epochs use all of train for omega only;
    later epochs split a fresh shuffle into D1 (omega) and D2 (arch), cycling D2 as needed."""
    order = epoch_order(n_train, seed, epoch)
    if epoch < warmup_epochs:
        return _steps(epoch, list(batch_indices(order, batch_size)))
    n1 = min(n_train - 1, max(1, round(d1_fraction * n_train)))
    d1, d2 = order[:n1], order[n1:]
    d1_batches = list(batch_indices(d1, batch_size))
    d2_batches = list(batch_indices(d2, batch_size))
    return _steps(epoch, d1_batches, [d2_batches[i % len(d2_batches)] for i in range(len(d1_batches))])


def plain_schedule(n_train: int, batch_size: int, seed: int, epoch: int) -> list[ScheduledStep]:
    """The steps of one retraining epoch over the whole training set."""
    return _steps(epoch, list(batch_indices(epoch_order(n_train, seed, epoch), batch_size)))


def _steps(epoch: int, omega: list[list[int]], arch: list[list[int]] | None = None) -> list[ScheduledStep]:
    last = len(omega) - 1
    return [ScheduledStep(epoch, i, b, arch[i] if arch else None, i == last) for i, b in enumerate(omega)]


def steps_per_epoch(n_train: int, batch_size: int, d1_fraction: float | None = None) -> int:
    if d1_fraction is None:
        return math.ceil(n_train / batch_size)
    n1 = min(n_train - 1, max(1, round(d1_fraction * n_train)))
    return math.ceil(n1 / batch_size)


def iterate_from(
    schedule_for_epoch: Callable[[int], list[ScheduledStep]], epochs: int, state: TrainState
) -> Iterator[ScheduledStep]:
    """The remaining steps from ``state`` on (skipping what a checkpoint already covers)."""
    for epoch in range(state.epoch, epochs):
        steps = schedule_for_epoch(epoch)
        start = state.batch_in_epoch if epoch == state.epoch else 0
        yield from steps[start:]
