"""The architecture step of SPT-DARTS (first order), as DARTS's ``architect.py``.

The :class:`Architect` owns the gate logits' optimizer and updates them on a D2 batch with
the generators and the head fixed, minimising the task loss of the full supernet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .config import SearchConfig
from .losses import task_loss
from .schedule import step_seed

if TYPE_CHECKING:
    from .trainer import Trainer


def compiled(fn, device: torch.device):
    """``fn`` (a loss returning a dict of tensors) under ``torch.compile``; shapes become
    dynamic once a second length is seen. On GPUs with CUDA graphs: each call starts a new
    graph step, and the returned terms are copied out of the graph's memory, which the next
    replay overwrites (the trainer keeps them as tensors until a logging step reads them)."""
    if device.type != "cuda":
        return torch.compile(fn, dynamic=None)
    graphed = torch.compile(fn, mode="reduce-overhead")

    def step(*args, **kwargs) -> dict[str, torch.Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        return {name: value.clone() for name, value in graphed(*args, **kwargs).items()}

    return step


class Architect:
    """Adam on the architecture parameters (betas ``search.arch_betas``, default (0.5, 0.999) as in DARTS)."""

    def __init__(self, trainer: Trainer, settings: SearchConfig) -> None:
        self.trainer = trainer
        self.params = trainer.model.architecture_parameters()
        self.compute_loss = compiled(task_loss, trainer.device) if trainer.compile_step else task_loss
        self.dropout = settings.arch_dropout
        self.optimizer = torch.optim.Adam(
            self.params, lr=settings.arch_lr, betas=tuple(settings.arch_betas), weight_decay=settings.arch_weight_decay,
            fused=trainer.optimizer.defaults.get("fused") or False,  # as the weight optimizer (fused on GPUs)
        )

    def step(self, indices: list[int], step: int) -> dict[str, torch.Tensor]:
        """One gate-logit update on the D2 batch ``indices``."""
        trainer, model = self.trainer, self.trainer.model
        torch.manual_seed(step_seed(trainer.seed, step, stream=3))
        model.train(self.dropout)  # (the frozen backbone is in eval mode either way)
        batch, scale = trainer.local_batch(indices)
        stats: dict[str, torch.Tensor] = {}
        if batch is not None:
            with trainer.training(self.params):  # the full supernet: one graph every step
                with trainer.autocast():
                    loss = self.compute_loss(model, batch)["loss"]
                trainer.scaled(loss * scale, "arch").backward()
            stats["arch_loss"] = loss.detach()
        trainer.clip_and_step(self.optimizer, self.params, trainer.scalers.get("arch"))
        return stats
