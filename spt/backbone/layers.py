"""What every family's layer runner shares: the per-sequence context and the runner interface.

A *layer runner* knows one model family's module layout: where its layers are, how its
embedding output is made, what a layer needs besides the hidden states (an attention
mask, MPNet's relative position bias, rotary angles), how to run a layer for only some
query positions, and which modules close the attention and feed-forward sublayers.
:class:`~spt.backbone.Backbone` holds one runner and is all the rest of the code sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class LayerContext:
    """Per-sequence inputs shared by every layer: attention mask, MPNet's position bias,
    and (rotary decoders) the ``(cos, sin)`` angles of every position."""

    attention_mask: Any
    position_bias: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def mask_form(keep: torch.Tensor, config: Any, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask (``True`` = attend) in the form the layers' attention takes: boolean
    for SDPA, additive (0 or the dtype's minimum) for eager attention."""
    return keep if config._attn_implementation == "sdpa" else _additive(keep, dtype)


def _additive(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``keep``, the dtype's minimum elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


def add_key_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive attention mask: ``mask`` (None, boolean or additive, ``(B, 1, Q or 1, S)``)
    with ``bias`` ``(B or 1, 1, 1, S)`` added to every query's score of each key."""
    if mask is None:
        return bias
    return (_additive(mask, bias.dtype) if mask.dtype == torch.bool else mask) + bias


def slice_queries(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    """The rows of a ``(B, 1, S, S)`` mask for queries ``start:``; a ``(B, 1, 1, S)`` key mask as it is."""
    if mask is None:
        return None
    return mask[:, :, start:, :] if mask.shape[2] == length else mask


def project_queries(projection: nn.Module, hidden: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``projection(queries)`` for the last positions ``queries`` of ``hidden`` (B, S, d).

    A slice of a longer sequence cannot be folded into one (B*T, d) matmul: the projection
    would expand its weight over the batch and copy it (B x d x d) in both passes. Training
    copies the queries once instead (B x T x d, forward only); with no backward to pay for,
    every position is projected and the slots' rows dropped (a view, no copy).
    """
    if queries.is_contiguous():
        return projection(queries)
    if torch.is_grad_enabled():
        return projection(queries.contiguous())
    return projection(hidden)[:, hidden.shape[1] - queries.shape[1]:]


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(B, S, h * head_dim)`` -> ``(B, h, S, head_dim)``."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, h, S, head_dim)`` -> ``(B, S, h * head_dim)``."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class LayerRunner:
    """One family's module layout (see the module docstring). ``base`` is the Hugging Face
    base model (``model.base_model``), ``config`` its config."""

    decoder = False  # causal attention, last-token pooling, a causal LM head
    # Which of embed, context and finish read parameters (outside the layers): a sharded
    # backbone gathers them for those calls (Backbone.root_calls).
    root_calls: tuple[str, ...] = ("embed",)

    def __init__(self, base: nn.Module, config: Any) -> None:
        self.base = base
        self.config = config

    def layers(self, base: nn.Module | None = None) -> nn.ModuleList:
        """The transformer layers of ``base`` (default: this runner's)."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        """``H_0``; ``token_mask`` is given only when the batch is padded."""
        raise NotImplementedError

    def context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int) -> LayerContext:
        """What the layers need for sequences shaped like ``hidden`` whose first ``prefix``
        positions are prompt slots; ``key_mask`` (B, S) says which keys may be attended."""
        raise NotImplementedError

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        raise NotImplementedError

    def keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, queries: torch.Tensor) -> torch.Tensor:
        """The layer's outputs for the last positions, whose states are ``queries`` (``hidden[:, start:]``);
        positions ``:start`` serve as keys and values only."""
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output from the last layer's (a decoder's final norm; encoders: as it is)."""
        return hidden

    def sublayer_outputs(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        """The modules whose outputs close a layer's attention and feed-forward sublayers
        (before the residual sum): where bottleneck adapters go."""
        raise NotImplementedError
