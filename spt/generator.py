"""Instance-aware prompt generator: a PHM bottleneck with masked adaptive pooling.

    H (B,T,d) -> PHM down d->m -> masked adaptive avg pool over real tokens to l
              -> activation -> PHM up m->d -> dropout -> P (B,l,d)
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


class PromptGenerator(nn.Module):
    """Generates ``l`` prompt vectors from one layer's hidden states."""

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        phm_n: int = 4,
        activation: str = "relu",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError("prompt.activation", f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        self.down = PHMLinear(hidden_size, bottleneck, phm_n)
        self.act = ACTIVATIONS[activation]()
        self.up = PHMLinear(bottleneck, hidden_size, phm_n)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, pool_weights: torch.Tensor) -> torch.Tensor:
        """``hidden`` (B,T,d) and ``pool_weights`` (B,l,T) from :func:`adaptive_pool_weights`."""
        # Pooling rows sum to 1 and the down projection is affine, so pooling first
        # gives the same result as projecting every token first, at l/T of the cost.
        pooled = torch.bmm(pool_weights.to(hidden.dtype), hidden)
        return self.dropout(self.up(self.act(self.down(pooled))))
