"""Method variants the prompted layer loop consults (docs/method.md §3 and §5).

Each variant is a small object chosen once per plan from the :class:`~spt.config.PromptConfig`
(:func:`variants_for`) and carried by the :class:`~spt.plan.Plan`; the loop
(:func:`spt.prompted.run_prompted_layers`) calls it at fixed points and never tests a flag.
A base class is the plain method (its hooks cost no kernel); a new variant subclasses one:

* :class:`PromptScale` - how big a generated prompt enters the mixing: as generated, or
  (:class:`TokenRMS`, ``prompt.normalize``) at the size of the layer's token states;
* :class:`SlotPresence` - how present the slots are to attention: attended as they are
  (a closed gate leaves zero slots, still attended), or (:class:`PresenceBias`,
  ``prompt.presence_bias``) in proportion to the chance that some gate inserted a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .backbone.layers import LayerContext, add_key_bias

if TYPE_CHECKING:
    from .config import PromptConfig


# ------------------------------------------------------------------ §3: the prompt's size


@dataclass(frozen=True)
class PromptScale:
    """Prompts enter the mixing as their generator makes them (``prompt.normalize: false``,
    and always in the sparse model)."""

    def measure(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor | None:
        """What the pass measures once, before its first prompt (nothing here)."""
        return None

    def apply(self, fresh: torch.Tensor, hidden: torch.Tensor,
              measured: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt to mix and its scale ``s`` (None: 1), see :func:`spt.mixing.mix`."""
        return fresh, None


@dataclass(frozen=True)
class TokenRMS(PromptScale):
    """``prompt.normalize``: each prompt vector at the root mean square of the example's real
    token states at that layer, a size the generator cannot move (the states enter detached),
    so a generator cannot grow or shrink its output to say what its gate should say."""

    def measure(self, batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        return token_rms_weights(batch, hidden)

    def apply(self, fresh: torch.Tensor, hidden: torch.Tensor,
              measured: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = token_rms(hidden, measured)
        return normalized(fresh), scale


def token_rms_weights(batch: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``sqrt(w_t / d)`` per token (B,T,1), ``w`` the mean-pooling weights: the norm of the
    token states scaled by it is their root mean square over the example's real tokens."""
    weights = batch.get("mean_weights")
    if weights is None:
        mask = batch["attention_mask"].to(hidden.dtype)
        weights = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    return (weights / hidden.shape[-1]).sqrt().to(hidden.dtype).unsqueeze(-1)


def normalized(fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` (B,l,d) with each vector's root mean square set to 1."""
    # rms_norm: one fused kernel each way on a GPU where the spelled-out formula takes ten.
    # (.to: autocast may run it in fp32; the slots keep the states' dtype.)
    return nn.functional.rms_norm(fresh, (fresh.shape[-1],), eps=1e-6).to(fresh.dtype)


def token_rms(hidden: torch.Tensor, rms_weights: torch.Tensor) -> torch.Tensor:
    """(B,1,1): the root mean square of each example's token states, the size normalized
    prompts are given (through the mixing weight: no pass over the prompt for it)."""
    # (.to: CUDA autocast runs norms in fp32; the slots keep the states' dtype)
    return torch.linalg.vector_norm(hidden.detach() * rms_weights, dim=(1, 2), keepdim=True).to(hidden.dtype)


# ------------------------------------------------------------------ §5: the slots' presence


@dataclass(frozen=True)
class SlotPresence:
    """Slots are attended as they are: a closed gate leaves zero slots, and zero slots are
    still attended ("closed" is not "absent")."""

    def inserted(self, absent: torch.Tensor | None, gate: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor | None:
        """``absent`` after a prompt was inserted with ``gate`` (``keep``: its ``1 - g``, if made)."""
        return absent

    def attend(self, context: LayerContext, absent: torch.Tensor | None, prompt_length: int,
               like: torch.Tensor) -> LayerContext:
        """The context the next layer attends the slots of ``like`` (B, S, d) with."""
        return context


@dataclass(frozen=True)
class PresenceBias(SlotPresence):
    """``prompt.presence_bias`` (supernet, learned gates): the slot keys entering layer
    ``i+1`` get ``log(pi_i)`` added to their scores, ``pi_i = 1 - prod_{j<=i} (1 - g_j)`` the
    chance that some gate so far inserted a prompt. With every gate at 0 the slots get no
    attention (the frozen model); a gate's gradient then also carries what the later layers
    gain from attending to the prompt at all."""

    def inserted(self, absent: torch.Tensor | None, gate: torch.Tensor | None,
                 keep: torch.Tensor | None) -> torch.Tensor | None:
        # prod_j (1 - g_j), one factor per inserted prompt
        keep = 1 - gate if keep is None else keep
        return keep if absent is None else absent * keep

    def attend(self, context: LayerContext, absent: torch.Tensor | None, prompt_length: int,
               like: torch.Tensor) -> LayerContext:
        return with_presence(context, absent, prompt_length, like)


# Presence below this counts as none: log(1e-6) leaves a slot key e^-13.8 of the weight it
# would have (the frozen model's output to about 1e-5) and keeps the gradient finite.
PRESENCE_FLOOR = 1e-6


def with_presence(context: LayerContext, absent: torch.Tensor, prompt_length: int, like: torch.Tensor) -> LayerContext:
    """``context`` with ``log(1 - absent)`` added to the attention scores of the slot keys of
    ``like`` (B, S, d): ``absent`` (B or 1, 1, 1) is the chance that no gate so far inserted a prompt."""
    log_presence = torch.log((1 - absent).clamp_min(PRESENCE_FLOOR)).to(like.dtype).view(-1, 1, 1, 1)
    bias = nn.functional.pad(log_presence.expand(-1, 1, 1, prompt_length), (0, like.shape[1] - prompt_length))
    return replace(context, attention_mask=add_key_bias(context.attention_mask, bias))


AS_GENERATED, TOKEN_RMS = PromptScale(), TokenRMS()
ATTENDED, PRESENCE_BIAS = SlotPresence(), PresenceBias()


def variants_for(prompt: PromptConfig) -> tuple[PromptScale, SlotPresence]:
    """The supernet's variants as its prompt config selects them (the sparse model uses the
    plain ones: it never rescales, and its gates are 1)."""
    return TOKEN_RMS if prompt.normalize else AS_GENERATED, PRESENCE_BIAS if prompt.presence_bias else ATTENDED
