"""Backbone adapters: the only code that knows Hugging Face model internals.

A :class:`Backbone` wraps a frozen encoder or decoder and lets the prompt machinery run it
one layer at a time: :meth:`Backbone.embed` gives ``H_0``, :meth:`Backbone.layer_context`
builds what every layer needs for a given sequence (attention mask, MPNet's relative
position bias, rotary angles), :meth:`Backbone.run_layer` applies layer ``i`` and
:meth:`Backbone.finish` turns the last layer's states into the model's output (a decoder's
final norm). Each family's module layout lives in a layer runner
(:mod:`~spt.backbone.encoders`, :mod:`~spt.backbone.decoders`).

Supported families: BERT-style encoders (``bert``, ``roberta``, ``xlm-roberta``,
``camembert``, ``electra``), ``mpnet``, and the decoders ``gpt2``, ``llama``, ``qwen2`` and
``mistral``. The linear layers of every family but GPT-2 can be held in 8 or 4 bits
(``model.quantize``, :mod:`~spt.backbone.quantize`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingHeadError, UnsupportedBackboneError, UserError
from ..hub import resolve_model_source
from .decoders import GPT2Layers, LlamaLayers
from .encoders import BertLayers, MPNetLayers
from .layers import LayerContext, LayerRunner
from .quantize import check_quantize, quantize_linears

logger = logging.getLogger(__name__)

# The name under which a sharded layer holds its runner's ``keys_values_only`` (search.sharding).
SHARDED_KEYS_VALUES_ONLY = "spt_keys_values_only"

__all__ = ["FAMILIES", "Backbone", "LayerContext", "check_supported", "load_backbone", "load_hf_model", "quantize_model",
           "sublayer_outputs"]


@dataclass(frozen=True)
class _Family:
    """What differs between model families."""

    runner: type[LayerRunner]  # the family's module layout
    lm_head_attr: str  # attribute of the *ForMaskedLM / *ForCausalLM model holding the LM head
    attention_projections: tuple[str, ...] = ("query", "value")  # LoRA targets (PEFT baselines)
    peft_prefix: bool = True  # PEFT prefix tuning works with this family's attention
    quantizable: bool = True  # its layers' projections are nn.Linear modules (model.quantize)


_LLAMA = _Family(LlamaLayers, "lm_head", attention_projections=("q_proj", "v_proj"))

FAMILIES: dict[str, _Family] = {
    "bert": _Family(BertLayers, "cls"),
    "roberta": _Family(BertLayers, "lm_head"),
    "xlm-roberta": _Family(BertLayers, "lm_head"),
    "camembert": _Family(BertLayers, "lm_head"),
    "electra": _Family(BertLayers, "generator_predictions"),
    # MPNet's attention adds its relative position bias, sized for the sequence alone, to
    # scores that PEFT's prefix keys lengthen: PEFT prefix tuning cannot run on it.
    "mpnet": _Family(MPNetLayers, "lm_head", attention_projections=("q", "v"), peft_prefix=False),
    # GPT-2's projections are fused Conv1D modules, whose weight its runner slices: not quantized.
    "gpt2": _Family(GPT2Layers, "lm_head", attention_projections=("c_attn",), quantizable=False),
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
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


class Backbone(nn.Module):
    """A frozen Hugging Face encoder or decoder run layer by layer.

    ``model`` is either a base model (``AutoModel``) or a language model (masked LM for an
    encoder, causal LM for a decoder), whose frozen LM head then serves the verbalizer
    heads. Every parameter is frozen and the module stays in eval mode: the backbone
    computes exactly what it computes alone. ``quantize`` (``model.quantize``: ``none``,
    ``int8``, ``nf4``, ``fp4``) replaces the linear layers of its transformer layers, in place,
    by bitsandbytes layers holding their weights in 8 or 4 bits (:mod:`~spt.backbone.quantize`).
    """

    def __init__(self, model: nn.Module, name: str = "", tokenizer: Any = None, quantize: str = "none") -> None:
        super().__init__()
        self.family = check_supported(model.config.model_type)
        self.name = name
        self.quantize = quantize
        self.tokenizer = tokenizer
        self.config = model.config
        self.base = model.base_model
        quantize_model(model, quantize)
        self.runner = self.family.runner(self.base, self.config)
        head = getattr(model, self.family.lm_head_attr, None) if model is not self.base else None
        self.lm_head = head
        self._electra_lm_decoder = getattr(model, "generator_lm_head", None) if head is not None else None
        if self.is_decoder and tokenizer is not None and tokenizer.pad_token is None:
            # GPT-2 has no pad token; padding is never attended, so any id serves.
            tokenizer.pad_token = tokenizer.eos_token
        self.requires_grad_(False)
        self.eval()

    # Set by :func:`search.sharding.shard_backbone` before it splits the weights across ranks
    # (``runtime.shard: fsdp``): no rank holds them whole afterwards.
    _kept_fingerprint: str | None = None

    def fingerprint(self) -> str:
        """A short hash of the architecture and of some weights: two backbones with the same
        fingerprint compute the same thing, whatever name or folder they were loaded from."""
        import hashlib
        import json

        if self._kept_fingerprint is not None:
            return self._kept_fingerprint

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
        return self.runner.layers()

    @property
    def is_decoder(self) -> bool:
        """Causal attention: prompts are seen by later positions only, the last token sums up."""
        return self.runner.decoder

    @property
    def default_pooling(self) -> str:
        """What ``head.pooling: auto`` means here: ``last`` (real token) for decoders, ``mean`` for encoders."""
        return "last" if self.is_decoder else "mean"

    @property
    def verbalizer_type(self) -> str:
        """The ``head.type`` its LM head serves: ``clm`` (decoders) or ``mlm`` (encoders)."""
        return "clm" if self.is_decoder else "mlm"

    def check_length(self, tokens: int, slots: int) -> None:
        """Refuse sequences of ``tokens`` real tokens plus ``slots`` prompt slots this backbone cannot take."""
        if not self.is_decoder:
            self._check_position_table(tokens)
            return
        window = getattr(self.config, "sliding_window", None)
        if window is not None and tokens + slots > window:
            raise ConfigError("model.max_length", f"{tokens} tokens + {slots} prompt slots exceed the attention window "
                              f"of {window} positions, which is not applied here; lower model.max_length")
        if self.config.model_type == "gpt2" and tokens > self.config.max_position_embeddings:
            raise ConfigError("model.max_length", f"must be at most {self.config.max_position_embeddings} "
                              f"(GPT-2's learned positions), got {tokens}")
        context = getattr(self.config, "max_position_embeddings", None)
        if self.config.model_type != "gpt2" and context is not None and tokens + slots > context:
            raise ConfigError("model.max_length", f"{tokens} tokens + {slots} prompt slots exceed the {context}-position "
                              f"context of this {self.config.model_type} backbone; lower model.max_length to at most "
                              f"{context - slots} (or prompt.length)")

    def _check_position_table(self, tokens: int) -> None:
        """An encoder's learned positions: the tokens (prompt slots take none) must fit its table,
        less the ``padding_idx + 1`` first rows RoBERTa-style models (RoBERTa, XLM-R, MPNet) skip."""
        table = getattr(getattr(self.base, "embeddings", None), "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            return
        reserved = 0 if table.padding_idx is None else table.padding_idx + 1
        limit = table.num_embeddings - reserved
        if tokens > limit:
            detail = f", the first {reserved} reserved for padding" if reserved else ""
            raise ConfigError("model.max_length", f"must be at most {limit} (the {self.config.model_type} backbone's "
                              f"position table: {table.num_embeddings} positions{detail}), got {tokens}; "
                              f"lower model.max_length to {limit} or less")

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``H_0``: the embedding output the first transformer layer receives; ``token_mask``
        (given for padded batches) places a decoder's tokens at their positions as alone."""
        return self.runner.embed(input_ids, token_type_ids, token_mask)

    def layer_context(self, hidden: torch.Tensor, key_mask: torch.Tensor | None, prefix: int = 0) -> LayerContext:
        """Attention inputs for sequences shaped like ``hidden`` whose keys ``key_mask`` (B, S) may
        attend (1 = attend); ``None`` when every key may, which also lets SDPA take its fast path.
        The first ``prefix`` positions are prompt slots (decoders: seen by every token, see no token).

        The mask is built here from what the caller knows on the host, never by looking at
        tensor values (that would make the device wait).
        """
        return self.runner.context(hidden, key_mask, prefix)

    def run_layer(self, index: int, hidden: torch.Tensor, context: LayerContext, queries_from: int = 0,
                  queries: torch.Tensor | None = None) -> torch.Tensor:
        """Apply transformer layer ``index`` to ``hidden`` (B, S, d).

        With ``queries_from = p`` only positions ``p:`` are computed (the result has
        ``S - p`` positions); positions ``:p`` still serve as keys and values. Prompt slots
        whose outputs nobody reads need no queries and no feed-forward pass. ``queries``:
        ``hidden[:, p:]`` where the caller holds it as a tensor of its own (no slice to undo
        in the backward pass).
        """
        layer = self.layers[index]
        if queries_from:
            queries = hidden[:, queries_from:] if queries is None else queries  # (see layers.project_queries)
            # (a sharded layer has the runner's method as its own, which gathers its weights around it)
            own = getattr(layer, SHARDED_KEYS_VALUES_ONLY, None)
            if own is not None:
                return own(hidden, context, queries)
            return self.runner.keys_values_only(layer, hidden, context, queries)
        return self.runner.run_layer(layer, hidden, context)

    def root_calls(self) -> list[str]:
        """The methods that read parameters outside the transformer layers (the embeddings, MPNet's
        position bias, a decoder's final norm, the LM head): a backbone sharded across ranks
        gathers those parameters around these calls only (:mod:`search.sharding`)."""
        names = {"embed": "embed", "context": "layer_context", "finish": "finish"}
        return [names[call] for call in self.runner.root_calls] + (["lm_logits"] if self.lm_head is not None else [])

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output states from the last layer's (a decoder's final norm)."""
        return self.runner.finish(hidden)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of the frozen LM head (masked or causal) for hidden states ``(..., d)``."""
        if self.lm_head is None:
            raise UserError("head.type", f"backbone {self.name!r} was loaded without its language-model head")
        if self._electra_lm_decoder is not None:
            return self._electra_lm_decoder(self.lm_head(hidden))
        return self.lm_head(hidden)



def quantize_model(model: nn.Module, quantize: str) -> nn.Module:
    """``model`` (a Hugging Face model of a supported family) with the linear layers of its
    transformer layers quantized in place as ``quantize`` (``model.quantize``) says; refused
    where this family or this installation cannot (:func:`~spt.backbone.quantize.check_quantize`)."""
    family = check_supported(model.config.model_type)
    check_quantize(quantize, model.config.model_type, family.quantizable)
    if quantize != "none":
        base = model.base_model
        quantize_linears(family.runner(base, base.config).layers(), quantize, next(base.parameters()).dtype)
    return model


def sublayer_outputs(base: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """Per layer of a Hugging Face base model of a supported family (e.g. a copy of a
    backbone's), the modules whose outputs close the attention and the feed-forward sublayer,
    before their residual sum: where bottleneck adapters go."""
    runner = check_supported(base.config.model_type).runner(base, base.config)
    return [runner.sublayer_outputs(layer) for layer in runner.layers()]


def load_hf_model(name: str, with_lm_head: bool = False, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A fresh Hugging Face model (base model, or with ``with_lm_head`` its masked or causal LM)
    and its tokenizer.

    Refuses unsupported families before loading weights, and (``with_lm_head``) a
    checkpoint whose LM head weights are missing: they would be random, and a verbalizer
    on them meaningless.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars report progress; keep the console readable
    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"model.backbone: cannot load {name!r} ({exc.__class__.__name__}: {str(exc).splitlines()[0]}). "
            "Give a local model directory, an alias (see `spt models list`), or a hub id this machine can reach."
        ) from None
    family = check_supported(config.model_type)
    decoder = family.runner.decoder
    loader = (AutoModelForCausalLM if decoder else AutoModelForMaskedLM) if with_lm_head else AutoModel
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
    if with_lm_head:
        missing = [k for k in info.get("missing_keys", []) if k.startswith(family.lm_head_attr)]
        if missing:
            kind, what = ("clm", "causal LM head") if decoder else ("mlm", "MLM head")
            detail = f"{len(missing)} head weights missing, e.g. {missing[0]}"
            raise MissingHeadError("head.type", f"{kind!r} needs a trained {what}, but {name!r} has none ({detail}). "
                                   "Use head.type: classifier.", detail)
    return model, AutoTokenizer.from_pretrained(source)


def load_backbone(name: str, with_lm_head: bool = False, dtype: torch.dtype = torch.float32,
                  quantize: str = "none") -> Backbone:
    """Load a frozen backbone from a local directory, a packaged alias or a hub id (with its LM head
    when ``with_lm_head``: the masked LM head of an encoder, the causal LM head of a decoder), its
    layers' linear weights quantized as ``quantize`` says (``model.quantize``)."""
    check_quantize(quantize)  # (bitsandbytes missing: refused before any weight is read)
    model, tokenizer = load_hf_model(name, with_lm_head, dtype)
    return Backbone(model, name=name, tokenizer=tokenizer, quantize=quantize)
