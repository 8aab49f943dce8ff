"""What the trainer needs from a model, written down once.

The supernet, the sparse model and every baseline (PEFT methods, full fine-tuning) meet
:class:`TrainableModel`; :class:`TrainableMixin` gives the parts that follow from
``weight_parameters`` and ``architecture_parameters``, so no model copies them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class PromptOutput:
    """Label scores and the representation ``h`` they were computed from."""

    logits: torch.Tensor
    representation: torch.Tensor


@runtime_checkable
class TrainableModel(Protocol):
    """A model the shared trainer can train, evaluate, checkpoint and save.

    ``model(batch)`` returns a :class:`PromptOutput`; ``weight_parameters`` are trained by
    the weight optimizer (``omega``: generators and head, or a PEFT method's parameters);
    ``architecture_parameters`` by the :class:`~search.architect.Architect` (the gate
    logits of a supernet, ``[]`` for every other model).
    """

    def __call__(self, batch: dict[str, torch.Tensor]) -> PromptOutput: ...

    def weight_parameters(self) -> list[nn.Parameter]: ...

    def architecture_parameters(self) -> list[nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]: ...

    def num_trainable_parameters(self) -> int: ...


class TrainableMixin:
    """Defaults for an ``nn.Module`` that defines ``weight_parameters``."""

    def weight_parameters(self) -> list[nn.Parameter]:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def architecture_parameters(self) -> list[nn.Parameter]:
        """Parameters the architecture step trains: none, unless the model is a supernet."""
        return []

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every trained parameter by name (weights and architecture), nothing frozen."""
        chosen = {id(p) for p in self.weight_parameters() + self.architecture_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in chosen}  # type: ignore[attr-defined]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trained tensors: what checkpoints and saved models hold."""
        return {n: p.detach() for n, p in self.trainable_parameters().items()}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())
