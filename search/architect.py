"""The architecture step of SPT-DARTS (first order), as DARTS's ``architect.py``.

The :class:`Architect` owns the gate logits' optimizer and updates them on a D2 batch with
the generators and the head fixed, minimising the task loss of the full supernet.
"""

from __future__ import annotations

import torch

from spt.trainable import TrainableModel

from .config import SearchConfig
from .feed import Feed
from .losses import task_loss
from .schedule import step_seed
from .steps import apply_gradients, compiled, held_still, scaled


class Architect:
    """Adam on the architecture parameters (betas ``search.arch_betas``, default (0.5, 0.999) as in DARTS).

    Its batches come from ``feed`` (the weight steps' feed); ``fused`` as the weight optimizer
    (fused on GPUs); fp16 gives it a loss scaler of its own: a gate step between two accumulated
    weight batches must not rescale the weight gradients waiting there.
    """

    def __init__(self, model: TrainableModel, settings: SearchConfig, feed: Feed, seed: int, fused: bool = False,
                 compile_step: bool = False) -> None:
        self.model, self.settings, self.feed, self.seed = model, settings, feed, seed
        self.params = model.architecture_parameters()
        self.weights = model.weight_parameters()  # (held still in a gate step)
        self.compute_loss = compiled(task_loss, feed.device) if compile_step else task_loss
        self.dropout = settings.arch_dropout
        self.optimizer = torch.optim.Adam(
            self.params, lr=settings.arch_lr, betas=tuple(settings.arch_betas), weight_decay=settings.arch_weight_decay,
            fused=fused,
        )
        self.scaler = feed.precision.scaler(feed.device)

    def step(self, indices: list[int], step: int) -> dict[str, torch.Tensor]:
        """One gate-logit update on the D2 batch ``indices``."""
        torch.manual_seed(step_seed(self.seed, step, stream=3))
        self.model.train(self.dropout)  # (the frozen backbone is in eval mode either way)
        batch, scale = self.feed.local_batch(indices)
        stats: dict[str, torch.Tensor] = {}
        if batch is not None:
            with held_still(self.weights):  # the full supernet: one graph every step
                with self.feed.autocast():
                    loss = self.compute_loss(self.model, batch)["loss"]
                scaled(loss * scale, self.scaler).backward()
            stats["arch_loss"] = loss.detach()
        apply_gradients(self.optimizer, self.params, self.settings.grad_clip, self.scaler)
        return stats
