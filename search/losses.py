"""Training losses: the task loss, and the supernet's architecture-consistency loss.

A loss is called as ``loss(model, batch, *loss.inputs(step))`` and returns named terms;
the trainer back-propagates ``"loss"`` and logs the others. ``inputs`` is the host-side
part (drawing an architecture mask); the call itself reads no tensor on the host, so
``runtime.compile: step`` can compile it whole when the loss is ``compilable``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spt.gates import sample_architecture_mask

from .schedule import step_seed


class TaskLoss:
    """Cross-entropy of the model's label scores."""

    compilable = True  # the same graph every step

    def inputs(self, step: int) -> tuple[Any, ...]:
        return ()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = nn.functional.cross_entropy(model(batch).logits.float(), batch["labels"])
        return {"loss": loss, "task_loss": loss}


class ConsistencyLoss(TaskLoss):
    """Task loss plus ``beta * MSE(h_masked, h_full)`` (architecture-consistency learning).

    Each step samples a Bernoulli(``mask_prob``) keep-mask over the candidate layers from
    ``(seed, step)`` on the host; the masked and the full pass of the same batch run as
    one batch of 2B, and the task loss is taken on the full pass.
    """

    compilable = False  # which generators run depends on the mask: another graph for each mask

    def __init__(self, weight: float, mask_prob: float, seed: int, candidates: int) -> None:
        self.weight, self.mask_prob, self.seed, self.candidates = weight, mask_prob, seed, candidates

    def inputs(self, step: int) -> tuple[Any, ...]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, stream=2))
        return (sample_architecture_mask(self.candidates, self.mask_prob, generator).tolist(),)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], mask: list[float]) -> dict[str, torch.Tensor]:  # type: ignore[override]
        full, masked = model.forward_consistency(batch, mask)
        task = nn.functional.cross_entropy(full.logits.float(), batch["labels"])
        consistency = nn.functional.mse_loss(masked.representation.float(), full.representation.float())
        return {"loss": task + self.weight * consistency, "task_loss": task, "consistency": consistency}


task_loss = TaskLoss()


def search_loss(consistency_weight: float, mask_prob: float, seed: int, candidates: int) -> TaskLoss:
    """The supernet's weight-step loss: with the consistency term unless its weight is 0."""
    return ConsistencyLoss(consistency_weight, mask_prob, seed, candidates) if consistency_weight > 0 else task_loss
