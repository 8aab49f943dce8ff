"""Instance-aware prompt generators: PHM bottlenecks with masked adaptive pooling.

    H (B,T,d) -> PHM down d->m -> masked adaptive avg pool over real tokens to l
              -> activation -> PHM up m->d -> dropout -> P (B,l,d)

:class:`PromptGenerators` holds the generators of every prompt layer of a model as one
stack, so the PHM weights of all of them are built once per step (and cached for
evaluation) instead of once per generator call.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError
from .phm import PHMLinear

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "identity": nn.Identity}


def adaptive_pool_weights(token_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Row-stochastic ``(B, length, T)`` weights of adaptive average pooling over real tokens.

    Real tokens are those where ``token_mask`` is nonzero, taken in order wherever they
    stand (left or right padding). Bin ``k`` of an example with ``n`` real tokens averages
    ranks ``[floor(k*n/l), ceil((k+1)*n/l))``, exactly as ``adaptive_avg_pool1d`` bins a
    sequence of length ``n``; padding gets weight 0, so it cannot change a prompt.
    """
    mask = token_mask.to(torch.long)
    n_real = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B,1)
    rank = mask.cumsum(dim=1) - 1  # (B,T): rank among real tokens
    k = torch.arange(length, device=mask.device).view(1, length, 1)
    n = n_real.unsqueeze(1)  # (B,1,1)
    start = torch.div(k * n, length, rounding_mode="floor")
    end = torch.div((k + 1) * n + length - 1, length, rounding_mode="floor")
    r = rank.unsqueeze(1)  # (B,1,T)
    inside = (r >= start) & (r < end) & mask.bool().unsqueeze(1)
    weights = inside.to(torch.float32)
    return weights / weights.sum(dim=2, keepdim=True).clamp(min=1.0)


class PromptGenerators(nn.Module):
    """``count`` prompt generators (one per prompt layer); ``forward(index, ...)`` runs one."""

    def __init__(
        self, count: int, hidden_size: int, bottleneck: int, phm_n: int = 4, activation: str = "relu", dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("prompt.activation", f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.count = count
        self.relu = activation == "relu"  # (applied by the down projection: fused where it can be)
        self.down = PHMLinear(hidden_size, bottleneck, phm_n, count, reset=False)
        self.act = ACTIVATIONS[activation]()
        self.up = PHMLinear(bottleneck, hidden_size, phm_n, count, reset=False)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():  # initialise generator by generator, in the order separate modules would
            for index in range(count):
                self.down.reset_parameters(index)
                self.up.reset_parameters(index)

    def weights(self, dtype: torch.dtype | None = None) -> tuple[list, list]:
        """The down and up ``(weight, bias)`` of every generator, built (and cast to ``dtype``)
        once for a forward pass."""
        return self.down.parts(dtype), self.up.parts(dtype)

    def forward(
        self, index: int, hidden: torch.Tensor, pool_weights: torch.Tensor, weights: tuple[list, list] | None = None,
    ) -> torch.Tensor:
        """Generator ``index`` on ``hidden`` (B,T,d) with ``pool_weights`` (B,l,T) from :func:`adaptive_pool_weights`."""
        down, up = weights if weights is not None else self.weights()
        # Pooling rows sum to 1 and the down projection is affine, so pooling first
        # gives the same result as projecting every token first, at l/T of the cost.
        if pool_weights.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
            pool_weights = pool_weights.to(hidden.dtype)  # (under autocast the matmul casts both)
        pooled = torch.bmm(pool_weights, hidden)
        inner = self.down(pooled, index, down, relu=True) if self.relu else self.act(self.down(pooled, index, down))
        return self.dropout(self.up(inner, index, up))


class PromptGenerator(PromptGenerators):
    """A single prompt generator: ``generator(hidden, pool_weights)``."""

    def __init__(self, hidden_size: int, bottleneck: int, phm_n: int = 4, activation: str = "relu", dropout: float = 0.1) -> None:
        super().__init__(1, hidden_size, bottleneck, phm_n, activation, dropout)

    def forward(self, hidden: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(0, hidden, pool_weights)
