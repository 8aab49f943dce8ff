"""Decoder internals: GPT-2 (learned absolute positions) and the LLaMA family (``llama``,
``qwen2``, ``mistral``: rotary positions, grouped-query attention, RMSNorm, gated MLP).

How prompt slots meet causal attention (the slots are prepended, ``[P_1..P_l] x_1..x_T``):

* **Masks.** Every token attends to every slot and, causally, to the real tokens up to
  itself; the slots attend to each other (all of them) and never to a token. Padding keys
  are masked, and each position always attends to itself, so no row of the mask is empty
  (a padded or not-yet-started slot row would otherwise turn into NaNs).
* **Positions.** Tokens keep the positions they have alone, ``0..n-1`` over the real
  tokens wherever padding stands (counted from the mask on the device, no host sync); so
  closed gates give the frozen model exactly, and left and right padding give the same
  result. GPT-2 adds its learned positions at the embedding only, and the slots (hidden
  states made by the generators from layer ``i`` on) take none. Rotary decoders rotate
  queries and keys in every layer: slot ``k`` of ``l`` sits at position ``k - l``
  (``-l..-1``), just before the first token. Rotary attention depends only on position
  differences, so this is exactly the text shifted past the slots (slots at ``0..l-1``,
  tokens at ``l..l+n-1``), with the tokens' own rotations unchanged.
* **Sliding windows** (Mistral, Qwen2 with ``use_sliding_window``) are not applied: a
  sequence (slots included) longer than the window is refused (``Backbone.check_length``).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerContext, LayerRunner, mask_form, merge_heads, slice_queries, split_heads


def token_positions(token_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` or ``(1, T)`` positions of the tokens as alone: ``0..n-1`` over the real tokens."""
    if token_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)
    return (token_mask.long().cumsum(1) - 1).clamp(min=0)


def causal_keep(length: int, prefix: int, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``(B or 1, 1, S, S)`` booleans (True = attend) of the layout in the module docstring."""
    index = torch.arange(length, device=device)
    keep = (index[None, :] <= index[:, None]) | (index[None, :] < prefix)
    if key_mask is None:
        return keep[None, None]
    keep = keep[None, None] & key_mask[:, None, None, :].bool()
    return keep | torch.eye(length, dtype=torch.bool, device=device)


class DecoderLayers(LayerRunner):
    """What GPT-2 and the LLaMA family share: the causal mask with slots, and positions."""

    decoder = True
    root_calls = ("embed", "finish")  # (the final norm; rotary angles come from buffers)

    def layers(self, base: nn.Module | None = None) -> nn.ModuleList:
        return (self.base if base is None else base).layers

    def context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int) -> LayerContext:
        mask = None
        if key_mask is not None or prefix or self.config._attn_implementation != "sdpa":
            keep = causal_keep(hidden.shape[1], prefix, key_mask, hidden.device)
            mask = mask_form(keep, self.config, hidden.dtype)
        # mask None: SDPA's own causal kernel, as the model alone takes it.
        return LayerContext(mask, rotary=self.rotary(hidden, key_mask, prefix))

    def rotary(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int):
        return None

    def attend(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention of ``(B, h, S, head_dim)`` queries on (grouped) keys and values."""
        groups = getattr(module, "num_key_value_groups", 1)
        if groups > 1:  # each key/value head serves ``groups`` query heads (expand: no host sync)
            B, h, S, dim = k.shape
            k, v = (x[:, :, None].expand(B, h, groups, S, dim).reshape(B, h * groups, S, dim) for x in (k, v))
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=module.scaling)


class GPT2Layers(DecoderLayers):
    """GPT-2: pre-LN blocks, fused ``c_attn`` (Conv1D), learned absolute positions, ``ln_f``."""

    def layers(self, base: nn.Module | None = None) -> nn.ModuleList:
        return (self.base if base is None else base).h

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        positions = token_positions(token_mask, input_ids.shape[1], input_ids.device)
        return self.base.drop(self.base.wte(input_ids) + self.base.wpe(positions))

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        out = layer(hidden, attention_mask=context.attention_mask)
        return out[0] if isinstance(out, tuple) else out

    def keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, queries: torch.Tensor) -> torch.Tensor:
        attn, d, start = layer.attn, hidden.shape[-1], hidden.shape[1] - queries.shape[1]
        normed = layer.ln_1(hidden)
        weight, bias = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: x @ weight + bias, columns q | k | v
        q = normed[:, start:] @ weight[:, :d] + bias[:d]
        k, v = (normed @ weight[:, d:] + bias[d:]).split(d, dim=-1)
        mask = slice_queries(context.attention_mask, start, hidden.shape[1])
        scores = self.attend(attn, *(split_heads(x, attn.head_dim) for x in (q, k, v)), mask)
        h = queries + attn.resid_dropout(attn.c_proj(merge_heads(scores)))
        return h + layer.mlp(layer.ln_2(h))

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.ln_f(hidden)

    def sublayer_outputs(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.attn.c_proj, layer.mlp.c_proj


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``(B, h, S, head_dim)`` with ``(B, S, head_dim)`` angles (rotate-half form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LlamaLayers(DecoderLayers):
    """LLaMA, Qwen2, Mistral: pre-RMSNorm blocks, rotary positions, grouped-query attention, ``norm``."""

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        return self.base.embed_tokens(input_ids)

    def rotary(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int):
        T = hidden.shape[1] - prefix
        tokens = token_positions(None if key_mask is None else key_mask[:, prefix:], T, hidden.device)
        slots = torch.arange(-prefix, 0, device=hidden.device).unsqueeze(0).expand(tokens.shape[0], -1)
        return self.base.rotary_emb(hidden, torch.cat([slots, tokens], dim=1))

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        out = layer(hidden, attention_mask=context.attention_mask, position_embeddings=context.rotary)
        return out[0] if isinstance(out, tuple) else out

    def keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, queries: torch.Tensor) -> torch.Tensor:
        attn, start = layer.self_attn, hidden.shape[1] - queries.shape[1]
        normed = layer.input_layernorm(hidden)
        cos, sin = context.rotary
        q = _rotate(split_heads(attn.q_proj(normed[:, start:]), attn.head_dim), cos[:, start:], sin[:, start:])
        k = _rotate(split_heads(attn.k_proj(normed), attn.head_dim), cos, sin)
        v = split_heads(attn.v_proj(normed), attn.head_dim)
        mask = slice_queries(context.attention_mask, start, hidden.shape[1])
        h = queries + attn.o_proj(merge_heads(self.attend(attn, q, k, v, mask)))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.norm(hidden)

    def sublayer_outputs(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.self_attn.o_proj, layer.mlp.down_proj
