"""Mixing: discard or add (docs/method.md §5).

At candidate layer ``i`` the slots entering layer ``i+1`` become

    P_i = (1 - lambda g_i) * P^_i + g_i * s * G_i(H_i)

``P^_i`` what the slots hold after layer ``i`` (zero before an example's first prompt),
``G_i(H_i)`` the new prompt, ``g_i`` its gate (supernet: ``alpha~_i * m_i``; sparse model:
1 at the selected layers), ``s`` its scale (1 unless ``prompt.normalize``,
:class:`spt.variants.TokenRMS`) and ``lambda`` = ``prompt.discard``, 1 or 0. A ``None``
gate or scale stands for 1 and costs no kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .plan import Plan


def mix(slots: torch.Tensor | None, fresh: torch.Tensor, gate: torch.Tensor | None, keep: torch.Tensor | None,
        scale: torch.Tensor | None, discard: float) -> torch.Tensor:
    """``P_i``: the slots after a prompt ``fresh`` is inserted into ``slots`` (None: zeros)
    with ``gate`` ``g``, ``keep`` its ``1 - g`` when already made, ``scale`` ``s``."""
    if slots is None:  # P^_i = 0: nothing to discard or add to
        return weighted(fresh, gate, scale)
    if discard == 1:
        return replace(slots, fresh, gate, keep, scale)
    return add(slots, fresh, gate, scale)


def weighted(fresh: torch.Tensor, gate: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """``g_i * s * G_i(H_i)``: a prompt inserted where the slots hold nothing (or replaced at ``g = 1``)."""
    weight = _weight(gate, scale)
    return fresh if weight is None else fresh * weight


def replace(slots: torch.Tensor, fresh: torch.Tensor, gate: torch.Tensor | None, keep: torch.Tensor | None,
            scale: torch.Tensor | None) -> torch.Tensor:
    """``lambda = 1``: ``P_i = (1 - g_i) * P^_i + g_i * s * G_i(H_i)``, the propagated prompt
    replaced in proportion to the gate (``lerp(P^, sG, g)``)."""
    if gate is None:  # g = 1: nothing of P^ is kept
        return weighted(fresh, None, scale)
    if gate.requires_grad:
        # a gate step: lerp's backward gives the gate's gradient in fewer kernels
        return torch.lerp(slots, fresh if scale is None else fresh * scale, gate)
    weight = _weight(gate, scale)
    return torch.addcmul(slots * (1 - gate if keep is None else keep), fresh, weight)


def add(slots: torch.Tensor, fresh: torch.Tensor, gate: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    """``lambda = 0``: ``P_i = P^_i + g_i * s * G_i(H_i)``, the new prompt added to the propagated one."""
    weight = _weight(gate, scale)
    return slots + fresh if weight is None else torch.addcmul(slots, fresh, weight)


def _weight(gate: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    """``g * s``, either None standing for 1 (None: both are)."""
    return gate if scale is None else scale if gate is None else gate * scale


def mixing_weights(plan: Plan, gates: torch.Tensor, discard: float, like: torch.Tensor) -> tuple[tuple, tuple | None]:
    """Per generator, the weight ``g`` of its new prompt (0 for the examples its rows leave out)
    and, for discard 1, the share ``1 - g`` of the propagated prompt kept, each (B or 1, 1, 1).

    One kernel each for the whole pass: a per-layer ``lerp`` computes ``1 - g`` again in every
    layer's backward, and per-layer row masks each cost a host-to-device copy. With the
    gates trained (a gate step) no ``1 - g``: lerp's backward then costs less than two products'.
    """
    rows = {step.generator: step.rows for step in plan.layers if step.generator is not None}
    weights = gates.view(-1, 1, 1, 1)
    width = next((len(r) for r in rows.values() if r is not None), 0)
    if width:
        table = [rows[j] if rows.get(j) is not None else (True,) * width for j in range(len(gates))]
        mask = torch.tensor(table, dtype=gates.dtype).view(len(gates), width, 1, 1)
        weights = weights * mask.to(gates.device, non_blocking=True)
    weights = weights.to(like.dtype)
    keeps = discard == 1 and not weights.requires_grad  # (a gate step mixes by lerp)
    return weights.unbind(0), (1 - weights).unbind(0) if keeps else None
