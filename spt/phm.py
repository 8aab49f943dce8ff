"""Parameterized hypercomplex multiplication (PHM) layers, stacked.

The weight of a ``d_in -> d_out`` projection is a sum of ``n`` Kronecker products

    W = sum_j A_j (x) S_j,   A_j in R^{n x n},   S_j in R^{(d_in/n) x (d_out/n)}

so one layer holds ``n**3 + d_in*d_out/n + d_out`` parameters instead of
``d_in*d_out + d_out``. ``n = 1`` is an ordinary linear layer (``W = a * S``).

A :class:`PHMLinear` holds ``count`` such layers of the same shape (one per prompt
generator), so the weights of all of them are built by one einsum per step, and cached
while the parameters do not change and no gradient is recorded (evaluation, inference).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def phm_parameter_count(d_in: int, d_out: int, n: int) -> int:
    """Number of parameters of one ``d_in -> d_out`` PHM layer (bias included)."""
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


def kronecker_sum(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``sum_j kron(A[..., j], S[..., j])`` for factors ``A (..., n, n, n)``, ``S (..., n, p, q)``."""
    n, p, q = S.shape[-3], S.shape[-2], S.shape[-1]
    # kron(A, S)[a*p + i, b*q + k] = A[a, b] * S[i, k]
    return torch.einsum("...jab,...jik->...aibk", A, S).reshape(*S.shape[:-3], n * p, n * q)


class _AddmmReLU(torch.autograd.Function):
    """``relu(bias + x @ weight)`` as one fused GEMM, with the backward ``torch._addmm_activation`` lacks
    (the same kernels autograd runs for ``addmm`` then ``relu``)."""

    @staticmethod
    def forward(ctx, bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        out = torch._addmm_activation(bias, x, weight)
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, out = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        need_bias, need_x, need_weight = ctx.needs_input_grad
        return (grad.sum(0) if need_bias else None, grad @ weight.t() if need_x else None,
                x.t() @ grad if need_weight else None)


class PHMLinear(nn.Module):
    """``count`` PHM layers ``d_in -> d_out`` with the same ``n``; ``forward(x, index)`` applies one."""

    def __init__(self, d_in: int, d_out: int, n: int = 4, count: int = 1, reset: bool = True) -> None:
        super().__init__()
        check_phm_divides(n, d_in=d_in, d_out=d_out)
        self.d_in, self.d_out, self.n, self.count = d_in, d_out, n, count
        self.A = nn.Parameter(torch.empty(count, n, n, n))
        self.S = nn.Parameter(torch.empty(count, n, d_in // n, d_out // n))
        self.bias = nn.Parameter(torch.empty(count, d_out))
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        if reset:  # (a caller that interleaves the initialisation of several layers passes False)
            for index in range(count):
                self.reset_parameters(index)

    @torch.no_grad()
    def reset_parameters(self, index: int = 0) -> None:
        # Var(W) = n * Var(A) * Var(S); Var(A) = 1/n keeps W at the scale of an
        # nn.Linear initialised with the same bound on S.
        nn.init.normal_(self.A[index], std=1.0 / math.sqrt(self.n))
        bound = 1.0 / math.sqrt(self.d_in)
        nn.init.uniform_(self.S[index], -bound, bound)
        nn.init.uniform_(self.bias[index], -bound, bound)

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All ``count`` weights ``(count, d_in, d_out)`` (cast to ``dtype`` when given); cached
        while no gradient is recorded and the parameters do not change."""
        return self._weight_and_bias(dtype)[0]

    def _weight_and_bias(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if dtype is None else tensor.to(dtype)

        if torch.is_grad_enabled() and any(p.requires_grad for p in (self.A, self.S, self.bias)):
            return cast(self._built()), cast(self.bias)
        key = tuple((p._version, p.data_ptr()) for p in (self.A, self.S, self.bias))
        key += (torch.is_inference_mode_enabled(), dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, (cast(self._built()), cast(self.bias)))
        return self._cache[1]

    def _built(self) -> torch.Tensor:
        # In the parameters' precision, whatever autocast says: the factors are tiny, and
        # casting the built weight once (and its gradient once) beats casting every factor.
        with torch.autocast(self.A.device.type, enabled=False):
            return kronecker_sum(self.A, self.S)

    def parts(self, dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(weight, bias)`` of each layer, split from the stack once per pass, in ``dtype``.

        One ``unbind`` instead of an index per use: its backward is one stack of the
        gradients, where indexing would zero and copy a whole stack for every use; one cast
        of the stack (bf16) instead of one per matmul.
        """
        weight, bias = self._weight_and_bias(dtype)
        return list(zip(weight.unbind(0), bias.unbind(0)))

    def forward(self, x: torch.Tensor, index: int = 0, parts: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                relu: bool = False) -> torch.Tensor:
        """Layer ``index`` applied to ``x (..., d_in)``; ``parts`` from :meth:`parts` when already split;
        ``relu``: followed by a ReLU."""
        weight, bias = (self.parts() if parts is None else parts)[index]
        x2d = x.reshape(-1, self.d_in)
        if relu and x2d.dtype == weight.dtype == bias.dtype:  # (CUDA autocast has no rule for the fused operator)
            # The ReLU rides in the GEMM (cuBLASLt's epilogue on a GPU: one kernel, not two).
            out = _AddmmReLU.apply(bias, x2d, weight)
        else:
            out = torch.addmm(bias, x2d, weight)
            out = torch.relu(out) if relu else out
        return out.reshape(*x.shape[:-1], self.d_out)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, n={self.n}, count={self.count}"
