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


def budget_shift(logits: torch.Tensor, budget: float, iterations: int = 40) -> torch.Tensor:
    """The shift ``s`` with ``sum_i sigmoid(a_i + s) = budget``, by bisection on the device
    (a fixed number of halvings: no host sync). The "shifted global sigmoid" of S3Delta
    (Hu et al., 2022) for generators of equal size; ``budget`` in (0, number of gates)."""
    a = logits.detach()
    low = (torch.logit(torch.tensor(budget / a.numel(), dtype=a.dtype, device=a.device)) - a.max()).expand(())
    high = (torch.logit(torch.tensor(budget / a.numel(), dtype=a.dtype, device=a.device)) - a.min()).expand(())
    for _ in range(iterations):  # sum_i sigmoid(a_i + s) rises with s: [low, high] brackets the root
        mid = (low + high) / 2
        above = torch.sigmoid(a + mid).sum() > budget
        low, high = torch.where(above, low, mid), torch.where(above, mid, high)
    return (low + high) / 2


class LayerGates(nn.Module):
    """One gate ``alpha_i = sigmoid(a_i)`` per candidate layer, logits initialised to ``init``.

    With a ``budget`` (an expected number of open gates, ``prompt.gate_budget``) the gates
    are ``sigmoid(a_i + s)`` with one shift ``s`` solved each pass so that their sum is the
    budget: the search then ranks layers under a fixed expected size.
    """

    def __init__(self, num_gates: int, reparam: bool = True, init: float = 0.0, budget: float | None = None) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.full((num_gates,), float(init)))
        self.reparam = reparam
        self.budget = budget

    def alpha(self) -> torch.Tensor:
        """The gate probabilities ``sigmoid(a)`` (shifted to the budget when there is one)."""
        if self.budget is None:
            return torch.sigmoid(self.logits)
        return torch.sigmoid(self.logits + budget_shift(self.logits, self.budget))

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
