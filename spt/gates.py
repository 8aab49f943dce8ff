"""Learnable probability gates, their re-parameterization, and architecture masks."""

from __future__ import annotations

import torch
from torch import nn


def reparameterize(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha * sg(S) / S`` with ``S = sum(alpha)``: the value of ``alpha``, coupled gradients.

    With ``g = dL/d(result)``, the gradient reaching ``alpha_k`` is
    ``g_k - (1/S) * sum_i alpha_i * g_i``: raising one gate's importance lowers the others'.
    """
    total = alpha.sum()
    return alpha * (total.detach() / total)


class LayerGates(nn.Module):
    """One gate ``alpha_i = sigmoid(a_i)`` per candidate layer, logits initialised to ``init``."""

    def __init__(self, num_gates: int, reparam: bool = True, init: float = 0.0) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_gates,), float(init)))
        self.reparam = reparam

    def alpha(self) -> torch.Tensor:
        """The gate probabilities ``sigmoid(a)``."""
        return torch.sigmoid(self.logits)

    def forward(self) -> torch.Tensor:
        """Gate values used in the forward pass (re-parameterized when enabled)."""
        alpha = self.alpha()
        return reparameterize(alpha) if self.reparam else alpha


def sample_architecture_mask(
    num_gates: int, p: float = 0.5, generator: torch.Generator | None = None, rows: int | None = None
) -> torch.Tensor:
    """Bernoulli(p) keep-mask over candidate layers: shape ``(num_gates,)`` or ``(rows, num_gates)``."""
    shape = (num_gates,) if rows is None else (rows, num_gates)
    return (torch.rand(shape, generator=generator) < p).to(torch.float32)
