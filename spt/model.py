"""The prompt supernetwork and the sparse prompt model.

Both run the frozen backbone layer by layer through :func:`run_prompted_layers`:

* ``l`` prompt slots are **prepended** to the sequence, ``[P_1..P_l] [CLS] x_1..x_T``.
  They exist only from the first layer where a prompt is inserted; before it the
  backbone computes exactly what it computes alone (and runs without gradients).
* At candidate layer ``i`` the slots entering layer ``i+1`` become
  ``P_i = (1 - lambda*g_i) * P_hat_i + g_i * G_i(H_i)``, where ``P_hat_i`` is what the
  slots hold after layer ``i`` and ``g_i`` the gate (supernet: ``alpha~_i * m_i``;
  sparse model: 1 at the selected layers).

Gate values and masks may differ per example (shape ``(B, L)``), which lets the two
consistency passes (masked and full) run as one batch of ``2B``.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone
from .config import HeadConfig, PromptConfig
from .errors import ConfigError
from .gates import LayerGates
from .generator import PromptGenerator, adaptive_pool_weights
from .trainable import PromptOutput, TrainableMixin


def run_prompted_layers(
    backbone: Backbone,
    batch: dict[str, torch.Tensor],
    generators: dict[int, PromptGenerator],
    gate: torch.Tensor,
    active: torch.Tensor,
    prompt_length: int,
    discard: float,
) -> torch.Tensor:
    """Final states ``(B, T, d)`` of the real-token positions with prompts inserted.

    ``gate`` (B, L) holds ``g_i`` per example and layer; ``active`` (B, L) says where a
    prompt is inserted at all (structurally: a layer with ``active = 0`` contributes
    nothing and its generator is not run for that example).
    """
    token_mask = batch["attention_mask"]
    num_layers = backbone.num_layers
    B = token_mask.shape[0]
    layer_ids = torch.arange(num_layers, device=active.device)
    start = torch.where(active, layer_ids, num_layers).min(dim=1).values  # first prompt layer per example
    first = int(start.min())

    with torch.no_grad():  # nothing below the first prompt is trainable
        hidden = backbone.embed(batch["input_ids"], batch.get("token_type_ids"))
        if first > 0:
            context = backbone.layer_context(hidden, token_mask)
            for i in range(min(first, num_layers)):
                hidden = backbone.run_layer(i, hidden, context)
    if first >= num_layers:
        return hidden

    pool_weights = adaptive_pool_weights(token_mask, prompt_length)
    slots = hidden.new_zeros(B, prompt_length, hidden.shape[-1])
    started_before = None
    for i in range(first, num_layers):
        not_yet = start >= i  # examples whose first prompt is at i or later: P_hat_i = 0
        if i > first and bool(not_yet.any()):
            # Their slots went through earlier layers unattended; clear what that left.
            slots = slots * (~not_yet).view(B, 1, 1)
        started = start <= i
        generator = generators.get(i)
        if generator is not None:
            rows = active[:, i].nonzero().squeeze(1)
            if rows.numel():
                if rows.numel() == B:
                    fresh = generator(hidden, pool_weights)
                else:
                    fresh = slots.new_zeros(slots.shape).index_copy(
                        0, rows, generator(hidden[rows], pool_weights[rows])
                    )
                g = gate[:, i].view(B, 1, 1).to(hidden.dtype)
                slots = (1 - discard * g) * slots + g * fresh
        sequence = torch.cat([slots, hidden], dim=1)
        if started_before is None or not torch.equal(started, started_before):
            # Slots are attended only by examples whose first prompt layer has come.
            key_mask = torch.cat([started.view(B, 1).expand(B, prompt_length).to(token_mask.dtype), token_mask], dim=1)
            context = backbone.layer_context(sequence, key_mask)
            started_before = started
        if _slot_outputs_unused(i, num_layers, generators, gate, active, discard):
            hidden = backbone.run_layer(i, sequence, context, queries_from=prompt_length)
        else:
            out = backbone.run_layer(i, sequence, context)
            slots, hidden = out[:, :prompt_length], out[:, prompt_length:]
    return hidden


def _slot_outputs_unused(i: int, num_layers: int, generators: dict, gate: torch.Tensor, active: torch.Tensor, discard: float) -> bool:
    """Whether nothing reads what the slots hold after layer ``i``: after the last layer, or
    when layer ``i+1`` replaces every example's slots outright (lambda = 1, gate exactly 1)."""
    if i == num_layers - 1:
        return True
    nxt = i + 1
    return discard == 1 and nxt in generators and bool(active[:, nxt].all()) and bool((gate[:, nxt] == 1).all())


class PromptModel(TrainableMixin, nn.Module):
    """Shared part of the supernet and the sparse model: backbone, generators, head."""

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int],
    ) -> None:
        super().__init__()
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        self.backbone = backbone
        self.prompt_config = prompt
        self.head_config = head_config
        self.labels = list(labels)
        self.head = head
        self.layers = sorted(layers)
        self.generators = nn.ModuleDict(
            {
                str(i): PromptGenerator(
                    backbone.hidden_size, prompt.bottleneck, prompt.phm_n, prompt.activation, prompt.dropout
                )
                for i in self.layers
            }
        )

    def _generator_map(self) -> dict[int, PromptGenerator]:
        return {int(k): g for k, g in self.generators.items()}

    def _expand(self, values: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-candidate values (C,) or (B, C) -> per-layer (B, L); non-candidates 0."""
        values = values.to(self.head_device())
        if values.dim() == 1:
            values = values.unsqueeze(0).expand(batch_size, -1)
        full = values.new_zeros(batch_size, self.backbone.num_layers)
        return full.index_copy(1, torch.tensor(self.layers, device=values.device), values)

    def head_device(self) -> torch.device:
        return next(self.generators.parameters()).device

    def _encode(self, batch: dict[str, torch.Tensor], gate: torch.Tensor, active: torch.Tensor) -> PromptOutput:
        B = batch["input_ids"].shape[0]
        states = run_prompted_layers(
            self.backbone, batch, self._generator_map(), self._expand(gate, B), self._expand(active.float(), B) > 0,
            self.prompt_config.length, float(self.prompt_config.discard),
        )
        representation = self.head.representation(states, batch)
        return PromptOutput(self.head(representation), representation)

    def train(self, mode: bool = True) -> PromptModel:
        super().train(mode)
        self.backbone.train(False)
        return self

    def weight_parameters(self) -> list[nn.Parameter]:
        """``omega``: generator and head parameters."""
        return list(self.generators.parameters()) + list(self.head.parameters())


class PromptSupernet(PromptModel):
    """Frozen backbone + a generator and a probability gate on every candidate layer."""

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig, labels: list[str]
    ) -> None:
        prompt.validate(backbone.num_layers, backbone.hidden_size)
        super().__init__(backbone, prompt, head, head_config, labels, prompt.candidates(backbone.num_layers))
        self.gates = LayerGates(len(self.layers), reparam=prompt.reparam_gates, init=prompt.gate_init)

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
        self, batch: dict[str, torch.Tensor], arch_mask: torch.Tensor | None = None, hard_gates: bool = False
    ) -> PromptOutput:
        """Scores with gates ``alpha~ * m``; ``arch_mask`` (C,) or (B, C) over candidates.

        ``hard_gates=True`` uses the mask itself as gate values (1 = prompt inserted at
        full strength), which is what the sparse model computes.
        """
        mask = torch.ones(len(self.layers)) if arch_mask is None else arch_mask.float()
        mask = mask.to(self.gates.logits.device)
        gate = mask if hard_gates else self.gates() * mask
        return self._encode(batch, gate, mask)

    def forward_consistency(self, batch: dict[str, torch.Tensor], arch_mask: torch.Tensor) -> tuple[PromptOutput, PromptOutput]:
        """The full pass and the masked pass of the same batch, run as one batch of 2B."""
        B = batch["input_ids"].shape[0]
        doubled = {k: torch.cat([v, v], dim=0) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        mask = arch_mask.float().to(self.gates.logits.device)
        masks = torch.cat([torch.ones_like(mask).expand(B, -1), mask.expand(B, -1) if mask.dim() == 1 else mask])
        out = self._encode(doubled, self.gates() * masks, masks)
        full = PromptOutput(out.logits[:B], out.representation[:B])
        masked = PromptOutput(out.logits[B:], out.representation[B:])
        return full, masked


class SparsePromptModel(PromptModel):
    """Generators only at the selected layers, no gates (their value is 1)."""

    def __init__(
        self, backbone: Backbone, prompt: PromptConfig, head: nn.Module, head_config: HeadConfig,
        labels: list[str], layers: list[int],
    ) -> None:
        if not layers:
            raise ConfigError("mask.selected_layers", "is empty; a sparse model needs at least one prompt layer")
        bad = [i for i in layers if not 0 <= i < backbone.num_layers]
        if bad:
            raise ConfigError("mask.selected_layers", f"layers {bad} do not exist; the backbone has 0..{backbone.num_layers - 1}")
        super().__init__(backbone, prompt, head, head_config, labels, layers)

    @property
    def selected_layers(self) -> list[int]:
        return self.layers

    def forward(self, batch: dict[str, torch.Tensor]) -> PromptOutput:
        ones = torch.ones(len(self.layers))
        return self._encode(batch, ones, ones)

    def load_generators_from(self, supernet: PromptSupernet) -> None:
        """Start from the supernet's generator (and head) weights instead of from scratch."""
        for i in self.layers:
            self.generators[str(i)].load_state_dict(supernet.generators[str(i)].state_dict())
        self.head.load_state_dict(supernet.head.state_dict())
