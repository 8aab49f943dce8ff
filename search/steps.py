"""What the weight step (:class:`~search.trainer.Trainer`) and the gate step
(:class:`~search.architect.Architect`) share: a compiled loss, the gradients of one set of
parameters with the other held still, the loss scale (fp16), and averaging, clipping and
applying the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import distributed


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


@contextlib.contextmanager
def held_still(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """No gradients for ``params`` while inside (a weight step holds the gates, a gate step the weights).

    The caller runs the forward pass under the feed's autocast and the backward pass outside
    it: autograd gives each backward operator the dtypes of its forward one, and an
    autocast still in force would cast the gradients of fp32 operators (the generators'
    weight products) to bf16 and back.
    """
    params = list(params)
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def scaled(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """``loss`` times ``scaler``'s loss scale (fp16), so that small gradients do not underflow
    in the fp16 backward pass; ``loss`` itself without a scaler."""
    return loss if scaler is None else scaler.scale(loss)


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> None:
    """Scale the gradients of ``params`` by ``min(1, max_norm / norm)``, ``norm`` their joint 2-norm.

    What ``nn.utils.clip_grad_norm_`` does (less its 1e-6 added to the norm), in six kernels
    where it takes eight: the norm over the per-tensor norms, one ``max(1, norm / max_norm)``,
    one multi-tensor division. Gradients of several devices or dtypes go to torch's function.
    """
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if len({(g.device, g.dtype) for g in grads}) > 1 or any(g.is_sparse for g in grads):
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_div_(grads, (norm / max_norm).clamp_min(1.0))


def apply_gradients(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Average (torchrun), clip (``grad_clip`` > 0) and apply the gradients of ``params``; with a
    ``scaler`` (fp16), unscale them first, and skip the step where one is inf or nan."""
    distributed.average_gradients(params)  # no-op in a single process
    if scaler is not None and all(p.grad is None for p in params):
        return  # (nothing to apply: the scaler would find no gradient to check)
    if scaler is not None:
        scaler.unscale_(optimizer)  # (clipping sees the true gradients)
    if grad_clip > 0:
        clip_gradients(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skipped where a gradient overflowed; update() then shrinks the scale
        scaler.update()
    if optimizer.defaults.get("fused"):
        # A fused step writes the parameters without bumping their versions, which caches
        # keyed by version (the built PHM weights) rely on.
        torch.autograd.graph.increment_version(params)
    optimizer.zero_grad(set_to_none=True)
