"""Encoder internals: BERT-style layers (``bert``, ``roberta``, ``xlm-roberta``, ``camembert``,
``electra``) and MPNet (a relative position bias computed once per sequence length).

Attention is bidirectional: prompt slots placed before the tokens are seen by every token
and see every token. Positions are added at the embedding (BERT) or are relative (MPNet),
so slots placed before the text change nothing for the text itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerContext, LayerRunner, mask_form, merge_heads, project_queries, slice_queries, split_heads


class BertLayers(LayerRunner):
    """BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA."""

    def layers(self, base: nn.Module | None = None) -> nn.ModuleList:
        return (self.base if base is None else base).encoder.layer

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.base.embeddings(**kwargs)
        project = getattr(self.base, "embeddings_project", None)  # ELECTRA-small style
        return project(hidden) if project is not None else hidden

    def context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int) -> LayerContext:
        # ``None`` when every key may be attended, which also lets SDPA take its fast path.
        return LayerContext(None if key_mask is None else self.key_mask(key_mask, hidden.dtype))

    def key_mask(self, key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, 1, S)``: every query may attend the keys ``key_mask`` marks."""
        return mask_form(key_mask[:, None, None, :].bool(), self.config, dtype)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        out = layer(hidden, context.attention_mask)
        return out[0] if isinstance(out, tuple) else out

    def keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, queries: torch.Tensor) -> torch.Tensor:
        start = hidden.shape[1] - queries.shape[1]
        mask = slice_queries(context.attention_mask, start, hidden.shape[1])
        attn = layer.attention.self
        head_dim = hidden.shape[-1] // self.config.num_attention_heads
        scores = nn.functional.scaled_dot_product_attention(
            split_heads(project_queries(attn.query, hidden, queries), head_dim), split_heads(attn.key(hidden), head_dim),
            split_heads(attn.value(hidden), head_dim), attn_mask=mask, scale=attn.scaling,
        )
        attention_output = layer.attention.output(merge_heads(scores), queries)
        return layer.output(layer.intermediate(attention_output), attention_output)

    def sublayer_outputs(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.attention.output.dense, layer.output.dense


class MPNetLayers(BertLayers):
    """MPNet: no token types; a relative position bias, sized for the sequence, in every layer."""

    root_calls = ("embed", "context")  # (the position bias: an embedding of relative distances)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> torch.Tensor:
        return self.base.embeddings(input_ids=input_ids)

    def context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int) -> LayerContext:
        # Relative positions: slots placed before the tokens leave the distances between
        # real tokens unchanged.
        bias = self.base.encoder.compute_position_bias(hidden)
        return LayerContext(None if key_mask is None else self.key_mask(key_mask, hidden.dtype), bias)

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext) -> torch.Tensor:
        out = layer(hidden, context.attention_mask, context.position_bias)
        return out[0] if isinstance(out, tuple) else out

    def keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, queries: torch.Tensor) -> torch.Tensor:
        S = hidden.shape[1]
        start = S - queries.shape[1]
        mask = slice_queries(context.attention_mask, start, S)
        head_dim = hidden.shape[-1] // self.config.num_attention_heads
        attn = layer.attention.attn
        bias = context.position_bias[:, :, start:, :]
        if mask is not None:
            bias = bias + mask
        scores = nn.functional.scaled_dot_product_attention(
            split_heads(project_queries(attn.q, hidden, queries), head_dim), split_heads(attn.k(hidden), head_dim),
            split_heads(attn.v(hidden), head_dim), attn_mask=bias,
        )
        merged = attn.o(merge_heads(scores))
        attention_output = layer.attention.LayerNorm(layer.attention.dropout(merged) + queries)
        return layer.output(layer.intermediate(attention_output), attention_output)

    def sublayer_outputs(self, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
        return layer.attention.attn.o, layer.output.dense
