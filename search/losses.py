"""Training losses: the task loss, and the supernet's architecture-consistency loss.

A loss takes the trainer, a batch and the step number and returns named terms; the
trainer back-propagates ``"loss"`` and logs the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from spt.gates import sample_architecture_mask

from .schedule import step_seed

if TYPE_CHECKING:
    from .trainer import Trainer

TrainingLoss = Callable[["Trainer", dict[str, torch.Tensor], int], dict[str, torch.Tensor]]


def task_loss(trainer: Trainer, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """Cross-entropy of the model's label scores."""
    loss = nn.functional.cross_entropy(trainer.model(batch).logits.float(), batch["labels"])
    return {"loss": loss, "task_loss": loss}


class ConsistencyLoss:
    """Task loss plus ``beta * MSE(h_masked, h_full)`` (architecture-consistency learning).

    Each step samples a Bernoulli(``mask_prob``) keep-mask over the candidate layers from
    ``(seed, step)``; the masked and the full pass of the same batch run as one batch of
    2B, and the task loss is taken on the full pass.
    """

    def __init__(self, weight: float, mask_prob: float, seed: int) -> None:
        self.weight = weight
        self.mask_prob = mask_prob
        self.seed = seed

    def __call__(self, trainer: Trainer, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        model = trainer.model
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        mask = sample_architecture_mask(len(model.candidate_layers), self.mask_prob, generator)
        full, masked = model.forward_consistency(batch, mask)
        task = nn.functional.cross_entropy(full.logits.float(), batch["labels"])
        consistency = nn.functional.mse_loss(masked.representation.float(), full.representation.float())
        return {"loss": task + self.weight * consistency, "task_loss": task, "consistency": consistency}


def search_loss(consistency_weight: float, mask_prob: float, seed: int) -> TrainingLoss:
    """The supernet's weight-step loss: with the consistency term unless its weight is 0."""
    return ConsistencyLoss(consistency_weight, mask_prob, seed) if consistency_weight > 0 else task_loss
