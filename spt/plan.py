"""Planning a prompted pass on the host (docs/method.md §1).

What happens at each layer is decided before the pass, from the layer mask (and, in the
supernet, the architecture mask, which is sampled on the host): which generator runs for
which examples, where the key mask changes, which slots start from zero and which layers
need no slot outputs. Nothing inside a pass then reads a tensor's value, so a GPU never
waits for the host. Masks may differ per example, which lets the two consistency passes
(masked and full) run as one batch of ``2B``.

A plan also carries the method variants its layer loop consults (:mod:`spt.variants`): a
new variant is a small object there, not one more flag here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .variants import AS_GENERATED, ATTENDED, PromptScale, SlotPresence

Rows = tuple[bool, ...]
ArchMask = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]


@dataclass(frozen=True)
class LayerPlan:
    """What happens at one layer from the first prompt layer on (host-side facts only)."""

    layer: int
    generator: int | None  # index of the generator inserting a prompt here (None: no prompt)
    rows: Rows | None  # examples the prompt is inserted for (None: all)
    clear: Rows | None  # zero the slots of the examples marked False (they start here: P_hat = 0)
    started: Rows | None  # examples whose slots are attended from here on (None: all); set where it changes
    new_context: bool  # the key mask changes at this layer
    keys_values_only: bool  # nobody reads the slots' outputs of this layer


@dataclass(frozen=True)
class Plan:
    """The per-layer steps of one pass, whether its gates are exactly 1 (hard), and the
    variants its layer loop consults: how a generated prompt is scaled (``prompt.normalize``)
    and how present the slots are to attention (``prompt.presence_bias``)."""

    first: int  # the first prompt layer (num_layers: no prompt at all)
    layers: tuple[LayerPlan, ...]
    hard: bool
    scale: PromptScale = AS_GENERATED
    presence: SlotPresence = ATTENDED


def make_plan(num_layers: int, generator_layers: list[int], active: list[Rows], hard: bool, discard: float,
              scale: PromptScale = AS_GENERATED, presence: SlotPresence = ATTENDED) -> Plan:
    """Plan a pass: ``active[j][b]`` says whether generator ``j`` (at ``generator_layers[j]``)
    inserts a prompt for example ``b``; ``active`` of one row stands for every example.
    (``presence`` needs gates below 1: a hard plan's slots are fully present.)"""
    n_rows = len(active[0]) if active else 1
    at = {layer: j for j, layer in enumerate(generator_layers)}
    # (no min(..., default=...): torch.compile traces this function)
    starts = [min([generator_layers[j] for j in range(len(active)) if active[j][b]] + [num_layers]) for b in range(n_rows)]
    first = min(starts + [num_layers])
    steps, previous = [], None
    for i in range(first, num_layers):
        j = at.get(i)
        rows = active[j] if j is not None else None
        started = tuple(s <= i for s in starts)
        clear = tuple(s < i for s in starts) if i > first and i in starts else None
        nxt = at.get(i + 1)
        replaced_next = nxt is not None and hard and discard == 1 and all(active[nxt])
        steps.append(LayerPlan(
            layer=i,
            generator=j if rows is not None and any(rows) else None,
            rows=None if rows is None or all(rows) else rows,
            clear=clear,
            started=None if all(started) else started,
            new_context=started != previous,
            keys_values_only=i == num_layers - 1 or replaced_next,
        ))
        previous = started
    return Plan(first, tuple(steps), hard, scale, ATTENDED if hard else presence)


def active_rows(mask: ArchMask | None, count: int) -> list[Rows]:
    """Per generator, per example: is its prompt inserted? From a mask (C,) or (B, C): a host
    tensor or (what ``torch.compile`` traces without a break) nested lists/tuples of numbers."""
    if mask is None:
        return [(True,)] * count
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().tolist()  # a host tensor: no device sync
    rows = [list(mask)] if not isinstance(mask[0], (list, tuple)) else [list(r) for r in mask]
    return [tuple(bool(r[j]) for r in rows) for j in range(count)]
