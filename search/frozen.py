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

    def __init__(self, layer: int, flat: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor) -> None:
        self.layer, self.flat = layer, flat
        self.offsets, self.lengths = offsets, lengths  # (host tensors: rows() indexes on the host)
        self.zero_row = flat.shape[0] - 1

    @classmethod
    def compute(cls, model, split: EncodedSplit, device: torch.device,
                autocast: Callable[[], contextlib.AbstractContextManager], budget: float) -> FrozenStates | None:
        """Run ``model.states_below_prompts`` over all of ``split``; None (computing at most one
        batch) where the states would take more than ``budget`` bytes."""
        lengths = torch.tensor([len(ids) for ids in split.input_ids])
        offsets = lengths.cumsum(0) - lengths
        size = (int(lengths.sum()) + 1) * model.backbone.hidden_size
        if size * next(model.backbone.parameters()).element_size() > budget:
            return None
        flat = None
        order = longest_first(split, range(len(split)))
        # (not inference mode, even inside one: the states enter steps whose backward saves them)
        with torch.inference_mode(False), torch.no_grad():
            for start in range(0, len(order), BATCH):
                indices = torch.tensor(order[start:start + BATCH])
                with autocast():
                    states = model.states_below_prompts(collate(split, indices.tolist(), device))
                if flat is None:  # in the dtype the layers put out (CUDA autocast: fp32 after a layer norm)
                    if size * states.element_size() > budget:
                        return None
                    flat = states.new_zeros(size // states.shape[-1], states.shape[-1])
                real, flat_rows = _positions(offsets, lengths, indices, states.shape[1])
                source = real.view(-1).nonzero().squeeze(1).to(device, non_blocking=True)
                target = flat_rows[real].to(device, non_blocking=True)
                flat.index_copy_(0, target, states.reshape(-1, states.shape[-1]).index_select(0, source))
        return cls(model.frozen_upto, flat, offsets, lengths)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def rows(self, indices: Sequence[int], width: int) -> torch.Tensor:
        """``(B, width, d)`` states of the examples at ``indices``, right-padded with zeros."""
        real, flat_rows = _positions(self.offsets, self.lengths, torch.tensor(list(indices)), width)
        picked = torch.where(real, flat_rows, self.zero_row).view(-1).to(self.flat.device, non_blocking=True)
        return self.flat.index_select(0, picked).view(len(indices), width, -1)


def _positions(offsets: torch.Tensor, lengths: torch.Tensor, indices: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a right-padded ``(B, width)`` batch of the examples ``indices``: which positions are real
    tokens, and each position's row in the flat store (meaningful where real). Host tensors."""
    position = torch.arange(width)
    return position < lengths[indices, None], offsets[indices, None] + position
