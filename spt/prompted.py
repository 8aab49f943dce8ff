"""The prompted pass: the frozen backbone run layer by layer with prompt slots (docs/method.md §1, §5).

* ``l`` prompt slots are **prepended** to the sequence, ``[P_1..P_l] [CLS] x_1..x_T``.
  They exist only from the first layer where a prompt is inserted; before it the
  backbone computes exactly what it computes alone (and runs without gradients), from
  the states a batch brings for those layers where it brings them (:mod:`search.frozen`).
  In a decoder the tokens attend to the slots and the slots to each other, causally for
  the tokens (see :mod:`spt.backbone.decoders` for masks and positions).
* At each layer :func:`run_prompted_layers` does what the :class:`~spt.plan.Plan` says:
  a generator's prompt is mixed into the slots (:func:`spt.mixing.mix`), the key mask is
  rebuilt where it changes, and the plan's variants (:mod:`spt.variants`) scale the prompt
  and bias the slots' attention.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .backbone import Backbone
from .generator import PromptGenerators, adaptive_pool_weights
from .mixing import mix, mixing_weights
from .plan import Plan, Rows


def run_prompted_layers(
    backbone: Backbone,
    batch: dict[str, torch.Tensor],
    generators: PromptGenerators,
    plan: Plan,
    gates: torch.Tensor | None,
    prompt_length: int,
    discard: float,
    checkpointed: bool = False,
) -> torch.Tensor:
    """Final states ``(B, T, d)`` of the real-token positions with prompts inserted as ``plan`` says.

    ``gates`` holds one value per generator (the supernet's ``alpha~``); ``None`` with a
    hard plan, whose gates are 1 wherever a prompt is inserted. ``checkpointed``: each layer's
    forward is recomputed in the backward pass instead of keeping its activations.
    """
    token_mask = batch["attention_mask"]
    padded = is_padded(batch)
    hidden = entering(backbone, batch, plan.first, padded)
    if plan.first >= backbone.num_layers:
        return backbone.finish(hidden)

    pool, weights = _generator_inputs(batch, hidden, generators, prompt_length)
    mixing, keeps = (None, None) if plan.hard else mixing_weights(plan, gates, discard, hidden)
    measured = plan.scale.measure(batch, hidden)  # (once per pass)
    slots: torch.Tensor | None = None
    sequence: torch.Tensor | None = None  # [slots, tokens] as the next layer takes it
    absent: torch.Tensor | None = None  # what plan.presence keeps of the gates so far
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
            fresh, scale = plan.scale.apply(fresh, hidden, measured)
            slots, changed = mix(slots, fresh, gate, keep, scale, discard), True
            absent = plan.presence.inserted(absent, gate, keep)
        joined = changed or sequence is None
        if joined:
            sequence = torch.cat([slots, hidden], dim=1)
        if step.new_context:
            key_mask = _key_mask(step.started, token_mask, padded, prompt_length)
            base_context = backbone.layer_context(sequence, key_mask, prefix=prompt_length)
        if step.new_context or step.generator is not None:
            context = plan.presence.attend(base_context, absent, prompt_length, sequence)
        if step.keys_values_only:  # (the token states as queries: a tensor of their own when just joined)
            hidden = _run_layer(backbone, checkpointed, step.layer, sequence, context, prompt_length,
                                hidden if joined else None)
            sequence = None
        else:
            sequence = _run_layer(backbone, checkpointed, step.layer, sequence, context)
            slots, hidden = sequence[:, :prompt_length], sequence[:, prompt_length:]
    return backbone.finish(hidden)


def _run_layer(backbone: Backbone, checkpointed: bool, *args: object) -> torch.Tensor:
    """``backbone.run_layer(*args)``, checkpointed when asked and autograd records (runtime.activation_checkpointing)."""
    if checkpointed and torch.is_grad_enabled():
        # (non-reentrant: gradients reach the generators through the inputs; the RNG state is
        # restored for the recomputation, so dropout draws the same masks twice)
        return checkpoint(backbone.run_layer, *args, use_reentrant=False, preserve_rng_state=True)
    return backbone.run_layer(*args)


def _on(rows: Rows, like: torch.Tensor) -> torch.Tensor:
    """A (B, 1, 1) 0/1 tensor of ``rows`` on ``like``'s device (a host-to-device copy, no sync)."""
    return torch.tensor(rows, dtype=like.dtype).view(-1, 1, 1).to(like.device, non_blocking=True)


def _key_mask(started: Rows | None, token_mask: torch.Tensor, padded: bool, prompt_length: int) -> torch.Tensor | None:
    """Which keys of ``[slots, tokens]`` may be attended: the slots of the examples ``started``
    (None: all), the real tokens; None when that is every key (no padding, all started)."""
    if started is not None:
        rows = torch.tensor(started, dtype=token_mask.dtype).view(-1, 1).expand(-1, prompt_length)
        return torch.cat([rows.to(token_mask.device, non_blocking=True), token_mask], dim=1)
    if padded:
        return torch.cat([token_mask.new_ones(token_mask.shape[0], prompt_length), token_mask], dim=1)
    return None


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


# ------------------------------------------------------------------ below the first prompt


def is_padded(batch: dict[str, torch.Tensor]) -> bool:
    """Whether the batch holds padding (collate says so on the host; else the only fallback sync)."""
    padded = batch.get("has_padding")
    return bool(batch["attention_mask"].all().logical_not()) if padded is None else bool(padded)


def frozen_layers(backbone: Backbone, batch: dict[str, torch.Tensor], upto: int, padded: bool,
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


def entering(backbone: Backbone, batch: dict[str, torch.Tensor], first: int, padded: bool) -> torch.Tensor:
    """The states entering layer ``first``, from the states the batch brings where it brings them
    for a layer at or below it (kept per example by the trainer, :mod:`search.frozen`)."""
    kept, layer = batch.get("frozen_states"), batch.get("frozen_upto")
    start = (layer, kept) if kept is not None and layer <= first else None
    return frozen_layers(backbone, batch, first, padded, start)


def unprompted_states(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final states ``(B, T, d)`` of the backbone alone, no prompt anywhere (what a linear probe
    reads; "frozen states" in this project are the kept states below the first prompt layer)."""
    return backbone.finish(frozen_layers(backbone, batch, backbone.num_layers, is_padded(batch)))
