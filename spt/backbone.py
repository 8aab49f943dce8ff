"""Backbone adapters: the only module that knows Hugging Face encoder internals.

A :class:`Backbone` wraps a frozen encoder and lets the prompt machinery run it one
layer at a time: :meth:`Backbone.embed` gives ``H_0``, :meth:`Backbone.layer_context`
builds what every layer needs for a given sequence (attention mask, MPNet's relative
position bias), and :meth:`Backbone.run_layer` applies layer ``i``.

Supported families: BERT-style encoders (``bert``, ``roberta``, ``xlm-roberta``,
``camembert``, ``electra``) and ``mpnet``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedBackboneError, UserError
from .hub import resolve_model_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Family:
    """What differs between model families."""

    mlm_head_attr: str  # attribute of the *ForMaskedLM model holding the MLM head
    relative_position_bias: bool = False  # MPNet: bias computed once per sequence length
    attention_projections: tuple[str, str] = ("query", "value")  # LoRA targets (PEFT baselines)
    peft_prefix: bool = True  # PEFT prefix tuning works with this family's attention


FAMILIES: dict[str, _Family] = {
    "bert": _Family("cls"),
    "roberta": _Family("lm_head"),
    "xlm-roberta": _Family("lm_head"),
    "camembert": _Family("lm_head"),
    "electra": _Family("generator_predictions"),
    # MPNet's attention adds its relative position bias, sized for the sequence alone, to
    # scores that PEFT's prefix keys lengthen: PEFT prefix tuning cannot run on it.
    "mpnet": _Family("lm_head", relative_position_bias=True, attention_projections=("q", "v"), peft_prefix=False),
}


def check_supported(model_type: str) -> _Family:
    """The adapter for ``model_type``, or a clear error naming the supported families."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedBackboneError(
            f"model.backbone: model family {model_type!r} is not supported; "
            f"supported families: {', '.join(sorted(FAMILIES))}"
        )
    return family


@dataclass
class LayerContext:
    """Per-sequence inputs shared by every layer: attention mask and (MPNet) position bias."""

    attention_mask: Any
    position_bias: torch.Tensor | None = None


class Backbone(nn.Module):
    """A frozen Hugging Face encoder run layer by layer.

    ``model`` is either a base encoder (``AutoModel``) or a masked-LM model, whose
    MLM head then serves the verbalizer head. Every parameter is frozen and the
    module stays in eval mode: the backbone computes exactly what it computes alone.
    """

    def __init__(self, model: nn.Module, name: str = "", tokenizer: Any = None) -> None:
        super().__init__()
        self.family = check_supported(model.config.model_type)
        self.name = name
        self.tokenizer = tokenizer
        self.config = model.config
        self.base = model.base_model
        head = getattr(model, self.family.mlm_head_attr, None) if model is not self.base else None
        self.mlm_head = head
        self._electra_mlm_decoder = getattr(model, "generator_lm_head", None) if head is not None else None
        self.requires_grad_(False)
        self.eval()

    def fingerprint(self) -> str:
        """A short hash of the architecture and of some weights: two backbones with the same
        fingerprint compute the same thing, whatever name or folder they were loaded from."""
        import hashlib
        import json

        config = {k: v for k, v in self.config.to_dict().items() if not k.startswith(("_", "transformers_version", "architectures", "torch_dtype", "dtype"))}
        # (rounded to bf16, so a backbone stored in bf16 has the fingerprint of its fp32 original)
        weights = self.base.get_input_embeddings().weight[:4].detach().to(torch.bfloat16).float().cpu()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(weights.numpy().tobytes())
        return digest.hexdigest()[:16]

    def train(self, mode: bool = True) -> Backbone:
        # Frozen means frozen: no dropout in the backbone, whatever the caller asks.
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.encoder.layer

    def embed(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``H_0``: the embedding output the first transformer layer receives."""
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and self.config.model_type != "mpnet":
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.base.embeddings(**kwargs)
        project = getattr(self.base, "embeddings_project", None)  # ELECTRA-small style
        return project(hidden) if project is not None else hidden

    def layer_context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> LayerContext:
        """Attention inputs for sequences shaped like ``hidden`` whose keys ``key_mask`` (B, S) may
        attend (1 = attend); ``None`` when every key may, which also lets SDPA take its fast path.

        The mask is built here from what the caller knows on the host, never by looking at
        tensor values (that would make the device wait).
        """
        bias = None
        if self.family.relative_position_bias:
            # Relative positions: slots placed before the tokens leave the distances
            # between real tokens unchanged.
            bias = self.base.encoder.compute_position_bias(hidden)
        return LayerContext(None if key_mask is None else self.attention_mask(key_mask, hidden.dtype), bias)

    def attention_mask(self, key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, 1, S)`` mask in the form the layers' attention takes: boolean (True = attend)
        for SDPA, additive (0 or the dtype's minimum) for eager attention."""
        keep = key_mask[:, None, None, :].bool()
        if self.config._attn_implementation == "sdpa":
            return keep
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    def run_layer(self, index: int, hidden: torch.Tensor, context: LayerContext, queries_from: int = 0,
                  queries: torch.Tensor | None = None) -> torch.Tensor:
        """Apply transformer layer ``index`` to ``hidden`` (B, S, d).

        With ``queries_from = p`` only positions ``p:`` are computed (the result has
        ``S - p`` positions); positions ``:p`` still serve as keys and values. Prompt slots
        whose outputs nobody reads need no queries and no feed-forward pass. ``queries``:
        ``hidden[:, p:]`` where the caller holds it as a tensor of its own (no slice to undo
        in the backward pass).
        """
        if queries_from:
            return self._keys_values_only(self.layers[index], hidden, context, queries_from, queries)
        layer = self.layers[index]
        if self.family.relative_position_bias:
            out = layer(hidden, context.attention_mask, context.position_bias)
        else:
            out = layer(hidden, context.attention_mask)
        return out[0] if isinstance(out, tuple) else out

    def _keys_values_only(self, layer: nn.Module, hidden: torch.Tensor, context: LayerContext, start: int,
                          queries: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's outputs for positions ``start:`` (the same computation as the layer's own)."""
        B, S, _ = hidden.shape
        queries = hidden[:, start:] if queries is None else queries
        mask = context.attention_mask
        if mask is not None:
            mask = mask[:, :, start:, :] if mask.shape[2] == S else mask
        heads = self.config.num_attention_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, x.shape[1], heads, -1).transpose(1, 2)

        if self.family.relative_position_bias:  # MPNet
            attn = layer.attention.attn
            bias = context.position_bias[:, :, start:, :]
            if mask is not None:
                bias = bias + mask
            scores = nn.functional.scaled_dot_product_attention(split(attn.q(queries)), split(attn.k(hidden)), split(attn.v(hidden)), attn_mask=bias)
            merged = attn.o(scores.transpose(1, 2).reshape(B, S - start, -1))
            attention_output = layer.attention.LayerNorm(layer.attention.dropout(merged) + queries)
            return layer.output(layer.intermediate(attention_output), attention_output)
        attn = layer.attention.self
        scores = nn.functional.scaled_dot_product_attention(
            split(attn.query(queries)), split(attn.key(hidden)), split(attn.value(hidden)), attn_mask=mask, scale=attn.scaling
        )
        attention_output = layer.attention.output(scores.transpose(1, 2).reshape(B, S - start, -1), queries)
        return layer.output(layer.intermediate(attention_output), attention_output)

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the frozen MLM head for hidden states ``(..., d)``."""
        if self.mlm_head is None:
            raise UserError("head.type", f"backbone {self.name!r} was loaded without an MLM head")
        if self._electra_mlm_decoder is not None:
            return self._electra_mlm_decoder(self.mlm_head(hidden))
        return self.mlm_head(hidden)


def load_hf_model(name: str, with_mlm_head: bool = False, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A fresh Hugging Face model (base encoder or masked LM) and its tokenizer.

    Refuses unsupported families before loading weights, and (``with_mlm_head``) a
    checkpoint whose MLM head weights are missing: they would be random, and a
    verbalizer on them meaningless.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; keep the console readable
    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.backbone: cannot load {name!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Give a local model directory, an alias (minilm-l6, mpnet-base), or a hub id this machine can reach."
        ) from None
    family = check_supported(config.model_type)
    loader = AutoModelForMaskedLM if with_mlm_head else AutoModel
    # transformers prints load reports (unused pooler/MLM weights) to stdout: keep them in the log.
    captured = io.StringIO()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(captured):
            model, info = loader.from_pretrained(source, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    if captured.getvalue().strip():
        logger.debug("loading %s: %s", name, captured.getvalue().strip())
    if with_mlm_head:
        missing = [k for k in info.get("missing_keys", []) if k.startswith(family.mlm_head_attr)]
        if missing:
            raise UserError(
                f"head.type: 'mlm' needs a trained MLM head, but {name!r} has none "
                f"({len(missing)} head weights missing, e.g. {missing[0]}). Use head.type: classifier."
            )
    return model, AutoTokenizer.from_pretrained(source)


def load_backbone(name: str, with_mlm_head: bool = False, dtype: torch.dtype = torch.float32) -> Backbone:
    """Load a frozen backbone from a local directory, a packaged alias or a hub id."""
    model, tokenizer = load_hf_model(name, with_mlm_head, dtype)
    return Backbone(model, name=name, tokenizer=tokenizer)
