"""Parameterized hypercomplex multiplication (PHM) layer.

The weight of a ``d_in -> d_out`` projection is a sum of ``n`` Kronecker products

    W = sum_j A_j (x) S_j,   A_j in R^{n x n},   S_j in R^{(d_in/n) x (d_out/n)}

so the layer holds ``n**3 + d_in*d_out/n + d_out`` parameters instead of
``d_in*d_out + d_out``. ``n = 1`` is an ordinary linear layer (``W = a * S``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def phm_parameter_count(d_in: int, d_out: int, n: int) -> int:
    """Number of parameters of a ``PHMLinear(d_in, d_out, n)`` (bias included)."""
    return n**3 + d_in * d_out // n + d_out


def check_phm_divides(n: int, **dims: int) -> None:
    """Refuse a PHM ``n`` that does not divide every named dimension."""
    if n < 1:
        raise ConfigError("prompt.phm_n", f"must be a positive integer, got {n}")
    for name, dim in dims.items():
        if dim % n:
            divisors = [k for k in range(1, min(dim, 16) + 1) if dim % k == 0]
            raise ConfigError(
                "prompt.phm_n",
                f"n={n} does not divide {name}={dim}; PHM needs n to divide both the hidden "
                f"size and the bottleneck. Values that divide {name}: {divisors}",
            )


class PHMLinear(nn.Module):
    """A linear map whose weight is a sum of ``n`` Kronecker products."""

    def __init__(self, d_in: int, d_out: int, n: int = 4, bias: bool = True) -> None:
        super().__init__()
        check_phm_divides(n, d_in=d_in, d_out=d_out)
        self.d_in, self.d_out, self.n = d_in, d_out, n
        self.A = nn.Parameter(torch.empty(n, n, n))
        self.S = nn.Parameter(torch.empty(n, d_in // n, d_out // n))
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Var(W) = n * Var(A) * Var(S); Var(A) = 1/n keeps W at the scale of an
        # nn.Linear initialised with the same bound on S.
        nn.init.normal_(self.A, std=1.0 / math.sqrt(self.n))
        bound = 1.0 / math.sqrt(self.d_in)
        nn.init.uniform_(self.S, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def weight(self) -> torch.Tensor:
        """The full ``(d_in, d_out)`` weight ``sum_j kron(A_j, S_j)``."""
        n, p, q = self.n, self.d_in // self.n, self.d_out // self.n
        # kron(A, S)[a*p + i, b*q + k] = A[a, b] * S[i, k]
        return torch.einsum("jab,jik->aibk", self.A, self.S).reshape(n * p, n * q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight()
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, n={self.n}, bias={self.bias is not None}"
