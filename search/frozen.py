"""The states below the lowest layer that can get a prompt, computed once per split.

The layers below a sparse model's first prompt layer (a supernet's first candidate layer)
are frozen and see no prompt, so what they compute for an example never changes while the
model trains. :class:`FrozenStates` computes them once for every example of a split and
hands each batch its rows, so every later step and evaluation starts at that layer: with the
layers the search usually picks (the top ones), half of the backbone's forward pass.

They are computed in fixed batches (longest example first, :data:`BATCH` at a time), not
in the batches that first ask for them, so a resumed run reads exactly the values an
uninterrupted one does. Each example keeps its real tokens only; padding reads a zero row
(its keys are masked, and no pooling weighs it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from spt.inputs import EncodedSplit, collate, longest_first

BATCH = 64  # examples per batch when computing the states (fixed: see the module's docstring)


class FrozenStates:
    """Per example of one split, the states entering layer ``layer``, stored flat ``(sum T_i + 1, d)``."""

    def __init__(self, layer: int, flat: torch.Tensor, offsets: list[int], lengths: list[int]) -> None:
        self.layer, self.flat = layer, flat
        self.offsets, self.lengths = torch.tensor(offsets), torch.tensor(lengths)  # (host tensors: rows() indexes on the host)
        self.zero_row = flat.shape[0] - 1

    @classmethod
    @torch.no_grad()  # (not inference mode: the states enter steps whose backward saves them)
    def compute(cls, model, split: EncodedSplit, device: torch.device,
                autocast: Callable[[], contextlib.AbstractContextManager]) -> FrozenStates:
        """Run ``model.states_below_prompts`` over all of ``split``."""
        order = longest_first(split, range(len(split)))
        pieces: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), BATCH):
            indices = order[start:start + BATCH]
            with autocast():
                states = model.states_below_prompts(collate(split, indices, device))
            for row, i in enumerate(indices):
                pieces[i] = states[row, :len(split.input_ids[i])]
        lengths = [len(ids) for ids in split.input_ids]
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        zero = states.new_zeros(1, states.shape[-1])
        flat = torch.cat([pieces[i] for i in range(len(split))] + [zero])
        return cls(model.frozen_upto, flat, offsets, lengths)

    def rows(self, indices: Sequence[int], width: int) -> torch.Tensor:
        """``(B, width, d)`` states of the examples at ``indices``, right-padded with zeros."""
        rows = torch.tensor(list(indices))
        position = torch.arange(width)
        index = torch.where(position < self.lengths[rows, None], self.offsets[rows, None] + position, self.zero_row)
        picked = index.view(-1).to(self.flat.device, non_blocking=True)
        return self.flat.index_select(0, picked).view(len(indices), width, -1)


def fits(model, split: EncodedSplit, budget_mb: float) -> bool:
    """Whether ``split``'s states below ``model``'s prompts take at most ``budget_mb`` megabytes."""
    backbone = model.backbone
    element = next(backbone.parameters()).element_size()
    size = (sum(len(ids) for ids in split.input_ids) + 1) * backbone.hidden_size * element
    return size <= budget_mb * 2**20
