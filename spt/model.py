"""The prompt supernetwork and the sparse prompt model.

Both run the frozen backbone layer by layer through :func:`run_prompted_layers`:

* ``l`` prompt slots are **prepended** to the sequence, ``[P_1..P_l] [CLS] x_1..x_T``.
  They exist only from the first layer where a prompt is inserted; before it the
  backbone computes exactly what it computes alone (and runs without gradients). In a
  decoder the tokens attend to the slots and the slots to each other, causally for the
  tokens (see :mod:`spt.backbone.decoders` for masks and positions).
* At candidate layer ``i`` the slots entering layer ``i+1`` become
  ``P_i = (1 - lambda*g_i) * P_hat_i + g_i * G_i(H_i)``, where ``P_hat_i`` is what the
  slots hold after layer ``i`` and ``g_i`` the gate (supernet: ``alpha~_i * m_i``;
  sparse model: 1 at the selected layers, where the formula is a plain replace or add).

What happens at each layer is decided on the host before the pass, by a :class:`Plan`
made from the layer mask (and, in the supernet, the architecture mask, which is sampled
on the host): which generators run, for which examples, where the key mask changes and
which layers need no slot outputs. Nothing inside a pass reads a tensor's value, so a
GPU never waits for the host. Masks may differ per example, which lets the two
consistency passes (masked and full) run as one batch of ``2B``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .backbone import Backbone
from .backbone.layers import LayerContext, add_key_bias
from .config import HeadConfig, PromptConfig
from .errors import ConfigError, UserError
from .gates import LayerGates
from .generator import PromptGenerators, adaptive_pool_weights
from .heads import build_head
from .inputs import TextInput
from .serialization import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_trainable_state,
    load_weights,
    locate_model,
    model_sections,
    read_model_config,
    resolve_backbone,
    save_prompt_model,
    write_model_card,
)
from .trainable import PromptOutput, TrainableMixin

Rows = tuple[bool, ...]


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
    """The per-layer steps of one pass, whether its gates are exactly 1 (hard), whether
    generated prompts are rescaled to the token states' size (``prompt.normalize``) and
    whether slots are attended in proportion to their gates' presence (``prompt.presence_bias``)."""

    first: int  # the first prompt layer (num_layers: no prompt at all)
    layers: tuple[LayerPlan, ...]
    hard: bool
    normalize: bool = False
    presence_bias: bool = False


def make_plan(num_layers: int, generator_layers: list[int], active: list[Rows], hard: bool, discard: float,
              normalize: bool = False, presence_bias: bool = False) -> Plan:
    """Plan a pass: ``active[j][b]`` says whether generator ``j`` (at ``generator_layers[j]``)
    inserts a prompt for example ``b``; ``active`` of one row stands for every example.
    (``presence_bias`` needs gates below 1: a hard plan's slots are fully present.)"""
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
    return Plan(first, tuple(steps), hard, normalize, presence_bias and not hard)


def _on(rows: Rows, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1) 0/1 tensor of ``rows`` on ``like``'s device (a host-to-device copy, no sync)."""
    return torch.tensor(rows, dtype=like.dtype).view(-1, 1, 1).to(like.device, non_blocking=True)


def _mix(slots: torch.Tensor | None, fresh: torch.Tensor, gate: torch.Tensor | None, keep: torch.Tensor | None,
         scale: torch.Tensor | None, discard: float) -> torch.Tensor:
    """``keep * slots + g * s * fresh``, ``keep = 1 - lambda * g``: ``gate`` g None means 1,
    ``keep`` None means computed here, ``scale`` s (normalized prompts' size) None means 1,
    ``slots`` None means zeros."""
    if gate is not None and gate.requires_grad and slots is not None and discard == 1:
        # a gate step: lerp's backward gives the gate's gradient in fewer kernels
        return torch.lerp(slots, fresh if scale is None else fresh * scale, gate)
    weight = gate if scale is None else scale if gate is None else gate * scale
    if weight is None:
        return fresh if discard == 1 or slots is None else slots + fresh
    if slots is None or (gate is None and discard == 1):
        return fresh * weight
    if discard == 0:
        return torch.addcmul(slots, fresh, weight)
    return torch.addcmul(slots * (1 - gate if keep is None else keep), fresh, weight)


def _mixing_weights(plan: Plan, gates: torch.Tensor, discard: float, like: torch.Tensor) -> tuple[tuple, tuple | None]:
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


def _key_mask(started: Rows | None, token_mask: torch.Tensor, padded: bool, prompt_length: int) -> torch.Tensor | None:
    """Which keys of ``[slots, tokens]`` may be attended: the slots of the examples ``started``
    (None: all), the real tokens; None when that is every key (no padding, all started)."""
    if started is not None:
        rows = torch.tensor(started, dtype=token_mask.dtype).view(-1, 1).expand(-1, prompt_length)
        return torch.cat([rows.to(token_mask.device, non_blocking=True), token_mask], dim=1)
    if padded:
        return torch.cat([token_mask.new_ones(token_mask.shape[0], prompt_length), token_mask], dim=1)
    return None


# Presence below this counts as none: log(1e-6) leaves a slot key e^-13.8 of the weight it
# would have (the frozen model's output to about 1e-5) and keeps the gradient finite.
PRESENCE_FLOOR = 1e-6


def _with_presence(context: LayerContext, absent: torch.Tensor, prompt_length: int, like: torch.Tensor) -> LayerContext:
    """``context`` with ``log(1 - absent)`` added to the attention scores of the slot keys of
    ``like`` (B, S, d): ``absent`` (B or 1, 1, 1) is the chance that no gate so far inserted a prompt."""
    log_presence = torch.log((1 - absent).clamp_min(PRESENCE_FLOOR)).to(like.dtype).view(-1, 1, 1, 1)
    bias = nn.functional.pad(log_presence.expand(-1, 1, 1, prompt_length), (0, like.shape[1] - prompt_length))
    return replace(context, attention_mask=add_key_bias(context.attention_mask, bias))


def _generator_inputs(batch: dict[str, torch.Tensor], hidden: torch.Tensor, generators: PromptGenerators,
                      prompt_length: int) -> tuple[torch.Tensor, tuple[list, list]]:
    """Pooling weights and every generator's weights, cast once per pass to the dtype the
    matmuls run in (the autocast dtype, bf16, or the states' own), not once per use."""
    pool = batch.get("pool_weights")  # made on the host by spt.inputs.collate
    if pool is None or pool.shape[1] != prompt_length:
        pool = adaptive_pool_weights(batch["attention_mask"], prompt_length)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return pool.to(dtype), generators.weights(None if dtype == torch.float32 else dtype)


def _token_rms_weights(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``sqrt(w_t / d)`` per token (B,T,1), ``w`` the mean-pooling weights: the norm of the
    token states scaled by it is their root mean square over the example's real tokens."""
    weights = batch.get("mean_weights")
    if weights is None:
        mask = batch["attention_mask"].to(hidden.dtype)
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    return (weights / hidden.shape[-1]).sqrt().to(hidden.dtype).unsqueeze(-1)


def _normalized(fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` (B,l,d) with each vector's root mean square set to 1."""
    # rms_norm: one fused kernel each way on a GPU where the spelled-out formula takes ten.
    # (.to: autocast may run it in fp32; the slots keep the states' dtype.)
    return nn.functional.rms_norm(fresh, (fresh.shape[-1],), eps=1e-6).to(fresh.dtype)


def _token_rms(hidden: torch.Tensor, rms_weights: torch.Tensor) -> torch.Tensor:
    """(B,1,1): the root mean square of each example's token states, the size normalized
    prompts are given (through the mixing weight: no pass over the prompt for it)."""
    # (.to: CUDA autocast runs norms in fp32; the slots keep the states' dtype)
    return torch.linalg.vector_norm(hidden.detach() * rms_weights, dim=(1, 2), keepdim=True).to(hidden.dtype)


def run_prompted_layers(
    backbone: Backbone,
    batch: dict[str, torch.Tensor],
    generators: PromptGenerators,
    plan: Plan,
    gates: torch.Tensor | None,
    prompt_length: int,
    discard: float,
) -> torch.Tensor:
    """Final states ``(B, T, d)`` of the real-token positions with prompts inserted as ``plan`` says.

    ``gates`` holds one value per generator (the supernet's ``alpha~``); ``None`` with a
    hard plan, whose gates are 1 wherever a prompt is inserted.
    """
    token_mask = batch["attention_mask"]
    padded = _padded(batch)
    num_layers = backbone.num_layers
    hidden = _entering(backbone, batch, plan.first, padded)
    if plan.first >= num_layers:
        return backbone.finish(hidden)

    pool, weights = _generator_inputs(batch, hidden, generators, prompt_length)
    mixing, keeps = (None, None) if plan.hard else _mixing_weights(plan, gates, discard, hidden)
    rms_weights = _token_rms_weights(batch, hidden) if plan.normalize else None  # (once per pass)
    slots: torch.Tensor | None = None
    sequence: torch.Tensor | None = None  # [slots, tokens] as the next layer takes it
    absent: torch.Tensor | None = None  # (presence_bias) prod (1 - g_j) over the gates so far
    for step in plan.layers:
        changed = False
        if step.clear is not None:
            slots, changed = slots * _on(step.clear, slots), True
        if step.generator is not None:
            if plan.hard:
                gate, keep = None if step.rows is None else _on(step.rows, hidden), None
            else:
                gate, keep = mixing[step.generator], None if keeps is None else keeps[step.generator]
            fresh = generators(step.generator, hidden, pool, weights).to(hidden.dtype)  # (autocast: bf16 out)
            scale = _token_rms(hidden, rms_weights) if plan.normalize else None
            fresh = _normalized(fresh) if plan.normalize else fresh
            slots, changed = _mix(slots, fresh, gate, keep, scale, discard), True
            if plan.presence_bias:
                keep = 1 - gate if keep is None else keep
                absent = keep if absent is None else absent * keep
        joined = changed or sequence is None
        if joined:
            sequence = torch.cat([slots, hidden], dim=1)
        if step.new_context:
            key_mask = _key_mask(step.started, token_mask, padded, prompt_length)
            context = base_context = backbone.layer_context(sequence, key_mask, prefix=prompt_length)
        if plan.presence_bias and (step.new_context or step.generator is not None):
            context = _with_presence(base_context, absent, prompt_length, sequence)
        if step.keys_values_only:  # (the token states as queries: a tensor of their own when just joined)
            hidden = backbone.run_layer(step.layer, sequence, context, prompt_length, hidden if joined else None)
            sequence = None
        else:
            sequence = backbone.run_layer(step.layer, sequence, context)
            slots, hidden = sequence[:, :prompt_length], sequence[:, prompt_length:]
    return backbone.finish(hidden)


def _padded(batch: dict[str, torch.Tensor]) -> bool:
    """Whether the batch holds padding (collate says so on the host; else the only fallback sync)."""
    padded = batch.get("has_padding")
    return bool(batch["attention_mask"].all().logical_not()) if padded is None else bool(padded)


def _frozen_layers(backbone: Backbone, batch: dict[str, torch.Tensor], upto: int, padded: bool,
                   start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The states entering layer ``upto`` (``num_layers``: after the last), computed without slots
    and without autograd, exactly as the backbone alone computes them; from the embeddings, or
    from ``start``: ``(layer, the states entering it)``."""
    token_mask = batch["attention_mask"] if padded else None
    with torch.no_grad():  # nothing below the first prompt is trainable
        layer, hidden = start or (0, backbone.embed(batch["input_ids"], batch.get("token_type_ids"), token_mask))
        if upto > layer:
            context = backbone.layer_context(hidden, token_mask)
            for i in range(layer, min(upto, backbone.num_layers)):
                hidden = backbone.run_layer(i, hidden, context)
    return hidden


def _entering(backbone: Backbone, batch: dict[str, torch.Tensor], first: int, padded: bool) -> torch.Tensor:
    """The states entering layer ``first``, from the states the batch brings where it brings them
    for a layer at or below it (kept per example by the trainer, :mod:`search.frozen`)."""
    kept, layer = batch.get("frozen_states"), batch.get("frozen_upto")
    start = (layer, kept) if kept is not None and layer <= first else None
    return _frozen_layers(backbone, batch, first, padded, start)


def frozen_states(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final states ``(B, T, d)`` of the frozen backbone alone (no prompt anywhere)."""
    return backbone.finish(_frozen_layers(backbone, batch, backbone.num_layers, _padded(batch)))


class PromptModel(TrainableMixin, nn.Module):
    """Shared part of the supernet and the sparse model: backbone, generators, head.

    ``max_length`` is the number of tokens an input is cut to (``model.max_length`` of the
    run) and ``instruction`` the line placed before every input (``task.instruction``); both
    are saved with the model, so :meth:`predict` tokenizes new text as in training.
    """

    KIND: ClassVar[str]  # "supernet" or "sparse": the kind a saved model's config records

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int], max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        super().__init__()
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        self.backbone = backbone
        self.prompt_config = prompt
        self.head_config = head_config
        self.labels = list(labels)
        self.max_length = max_length
        self.instruction = instruction
        self.head = head
        self.layers = sorted(layers)
        self.generators = PromptGenerators(
            len(self.layers), backbone.hidden_size, prompt.bottleneck, prompt.phm_n, prompt.activation, prompt.dropout
        )

    @property
    def prompt_length(self) -> int:
        return self.prompt_config.length

    @property
    def frozen_upto(self) -> int:
        """The lowest layer that can get a prompt: what the layers below it compute for an example
        never changes (frozen, no prompt), so a trainer may compute it once per example
        (:mod:`search.frozen`) and pass it as ``batch["frozen_states"]`` with ``batch["frozen_upto"]``."""
        return self.layers[0]

    def states_below_prompts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The states ``(B, T, d)`` entering layer :attr:`frozen_upto`, as a forward pass computes them."""
        return _frozen_layers(self.backbone, batch, self.frozen_upto, _padded(batch))

    def _encode(self, batch: dict[str, torch.Tensor], plan: Plan, gates: torch.Tensor | None) -> PromptOutput:
        states = run_prompted_layers(
            self.backbone, batch, self.generators, plan, gates, self.prompt_config.length, float(self.prompt_config.discard)
        )
        representation = self.head.representation(states, batch)
        return PromptOutput(self.head(representation), representation)

    def _plan(self, active: list[Rows], hard: bool, normalize: bool = False) -> Plan:
        return make_plan(self.backbone.num_layers, self.layers, active, hard, float(self.prompt_config.discard), normalize,
                         self.prompt_config.presence_bias)

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        self.backbone.train(False)
        return self

    # ------------------------------------------------------------------ saving and using

    def save_pretrained(self, directory: str | os.PathLike, metrics: dict | None = None) -> Path:
        """Config JSON, trainable weights (safetensors) and a ``README.md`` model card in ``directory``."""
        path = save_prompt_model(self, directory)
        write_model_card(path, metrics)
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, backbone: Backbone | str | None = None, *,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None) -> PromptModel:
        """The model saved in a folder, or in a hub repo ("user/name", downloaded with
        ``snapshot_download``; with ``HF_HUB_OFFLINE=1`` read from the Hugging Face cache), in
        eval mode. An existing folder comes first. Its backbone is loaded from the saved reference
        (an alias, a hub id, or a folder relative to the model's folder) unless given: a model
        trained on a local backbone folder needs ``backbone=`` when it comes from the hub."""
        model = load_prompt_model(name_or_path, backbone, revision=revision, token=token, cache_dir=cache_dir)
        if not isinstance(model, cls):
            raise UserError("model", f"{name_or_path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = True, upload: bool = True,
                    metrics: dict | None = None) -> Path:
        """Save into a temporary folder, with a model card that loads it from ``repo_id`` (and
        ``metrics`` as its scores), and upload it to the Hugging Face Hub as ``repo_id`` (needs a
        reachable hub); ``upload=False`` only prepares the folder."""
        import tempfile

        folder = save_prompt_model(self, Path(tempfile.mkdtemp(prefix="spt-push-")) / repo_id.replace("/", "--"))
        write_model_card(folder, metrics, repo_id=repo_id)
        if upload:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        return folder

    @torch.inference_mode()
    def predict(self, texts: str | Sequence[str | tuple[str, str]], batch_size: int = 32) -> list[dict]:
        """Label and class probabilities of each text, tokenized as in training (saved
        ``max_length``, instruction and template); always one record per input, in order.

        ``texts`` is one string, or a list of inputs each a string or a ``(text_a, text_b)``
        pair for two-segment tasks (a bare string is one input, as in a transformers pipeline,
        never a sequence of characters)."""
        from .inputs import collate, encode_split, longest_first

        if self.max_length is None:
            raise UserError("model.max_length", "this model was saved without max_length; set model.max_length")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError("batch_size", f"must be a whole number >= 1, not {batch_size!r}")
        examples = [_text_input(t, n) for n, t in enumerate([texts] if isinstance(texts, str) else texts)]
        if not examples:
            return []
        split = encode_split(self.backbone.tokenizer, examples, self.max_length, self.head_config, self.instruction)
        device = next(self.generators.parameters()).device
        self.eval()
        order = longest_first(split, range(len(split)))
        results: list[dict] = [{}] * len(split)
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            rows = self(collate(split, indices, device, self.prompt_length)).logits.float().softmax(-1).tolist()
            for i, row in zip(indices, rows):
                best = max(range(len(row)), key=row.__getitem__)
                results[i] = {"label": self.labels[best], "probabilities": dict(zip(self.labels, row))}
        return results

    def weight_parameters(self) -> list[nn.Parameter]:
        """``omega``: generator and head parameters."""
        return list(self.generators.parameters()) + list(self.head.parameters())


def _text_input(item: object, position: int) -> TextInput:
    """One ``predict`` input as the tokenizer's :class:`TextInput`: a string, or a pair of strings."""
    if isinstance(item, str):
        return TextInput(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item):
        return TextInput(*item)
    raise UserError("texts", f"input {position} is {type(item).__name__} {item!r:.60}; give a string or a (text_a, text_b) "
                    "pair of strings")


ArchMask = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]


def _active_rows(mask: ArchMask | None, count: int) -> list[Rows]:
    """Per generator, per example: is its prompt inserted? From a mask (C,) or (B, C): a host
    tensor or (what ``torch.compile`` traces without a break) nested lists/tuples of numbers."""
    if mask is None:
        return [(True,)] * count
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().tolist()  # a host tensor: no device sync
    rows = [list(mask)] if not isinstance(mask[0], (list, tuple)) else [list(r) for r in mask]
    return [tuple(bool(r[j]) for r in rows) for j in range(count)]


class PromptSupernet(PromptModel):
    """Frozen backbone + a generator and a probability gate on every candidate layer."""

    KIND = "supernet"  # what a saved model's config calls it

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig, labels: list[str],
        max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        super().__init__(backbone, prompt, head, head_config, labels, prompt.candidates(backbone.num_layers), max_length,
                         instruction)
        self.gates = LayerGates(len(self.layers), reparam=prompt.reparam_gates, init=prompt.gate_init, budget=prompt.gate_budget)

    @property
    def candidate_layers(self) -> list[int]:
        return self.layers

    def alphas(self) -> torch.Tensor:
        """Current gate probabilities ``alpha`` per candidate layer."""
        return self.gates.alpha().detach()

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The gate logits ``a``."""
        return [self.gates.logits]

    def forward(
        self, batch: dict[str, torch.Tensor], arch_mask: ArchMask | None = None, hard_gates: bool = False
    ) -> PromptOutput:
        """Scores with gates ``alpha~ * m``; ``arch_mask`` (C,) or (B, C) over candidates (host values).

        ``hard_gates=True`` uses the mask itself as gate values (1 = prompt inserted at
        full strength), which is what the sparse model computes (with the supernet's own
        prompts: rescaled when ``prompt.normalize``, as in its training).
        """
        plan = self._plan(_active_rows(arch_mask, len(self.layers)), hard_gates, self.prompt_config.normalize)
        return self._encode(batch, plan, None if hard_gates else self.gates())

    def forward_consistency(self, batch: dict[str, torch.Tensor], arch_mask: ArchMask) -> tuple[PromptOutput, PromptOutput]:
        """The full pass and the masked pass (``arch_mask`` (C,), host values) of the same batch, as one batch of 2B."""
        B = batch["input_ids"].shape[0]
        doubled = {k: torch.cat([v, v], dim=0) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        masked = _active_rows(arch_mask, len(self.layers))
        active = [(True,) * B + (column[0],) * B for column in masked]
        out = self._encode(doubled, self._plan(active, hard=False, normalize=self.prompt_config.normalize), self.gates())
        return PromptOutput(out.logits[:B], out.representation[:B]), PromptOutput(out.logits[B:], out.representation[B:])


class SparsePromptModel(PromptModel):
    """Generators only at the selected layers, no gates (their value is 1)."""

    KIND = "sparse"

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int], max_length: int | None = None, instruction: str | None = None,
    ) -> None:
        if not layers:
            raise ConfigError("mask.selected_layers", "is empty; a sparse model needs at least one prompt layer")
        bad = [i for i in layers if not 0 <= i < backbone.num_layers]
        if bad:
            raise ConfigError("mask.selected_layers", f"layers {bad} do not exist; the backbone has 0..{backbone.num_layers - 1}")
        super().__init__(backbone, prompt, head, head_config, labels, layers, max_length, instruction)
        self.plan = self._plan([(True,)] * len(self.layers), hard=True)  # fixed at construction

    @property
    def selected_layers(self) -> list[int]:
        return self.layers

    def forward(self, batch: dict[str, torch.Tensor]) -> PromptOutput:
        return self._encode(batch, self.plan, None)

    @torch.no_grad()
    def load_generators_from(self, supernet: PromptSupernet) -> None:
        """Start from the supernet's generator (and head) weights instead of from scratch."""
        index = [supernet.layers.index(i) for i in self.layers]
        for mine, theirs in zip(self.generators.parameters(), supernet.generators.parameters()):
            mine.copy_(theirs[index])
        self.head.load_state_dict(supernet.head.state_dict())


def load_prompt_model(name_or_path: str | os.PathLike, backbone: Backbone | str | None = None, *,
                      revision: str | None = None, token: str | bool | None = None,
                      cache_dir: str | os.PathLike | None = None) -> PromptModel:
    """Rebuild a saved supernet or sparse model, in eval mode (loading its backbone unless given),
    from a folder or a hub repo id (``revision``, ``token``, ``cache_dir``: see ``snapshot_download``)."""
    directory, origin = locate_model(name_or_path, revision, token, cache_dir)
    rerun = f"download it again (force_download) from {origin}" if origin else f"rerun the spt command that wrote {directory}"
    fix = f"; save the model again ({rerun})"
    config = read_model_config(directory, fix)
    prompt, head_config = model_sections(config, directory / CONFIG_FILE, fix)
    tensors = load_weights(directory, config, fix)  # (before the backbone: an edited fingerprint is named as such)
    backbone = resolve_backbone(config, directory, head_config.verbalizer, backbone, origin)
    head = build_head(backbone, head_config, config["labels"])
    inputs = {"max_length": config.get("max_length"), "instruction": config.get("instruction")}
    if config["kind"] == "supernet":
        model: PromptModel = PromptSupernet(backbone, prompt, head, head_config, config["labels"], **inputs)
    else:
        model = SparsePromptModel(backbone, prompt, head, head_config, config["labels"], config["layers"], **inputs)
    load_trainable_state(model, tensors, str(directory / WEIGHTS_FILE))
    return model.eval()
