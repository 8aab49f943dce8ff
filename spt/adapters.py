"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) in a frozen model.

An adapter ``h -> h + W_up act(W_down h)`` is applied to the output of a sublayer's last
projection, before the sublayer's residual sum (and, in post-LN encoders, its layer norm):

* ``houlsby``: after the attention and after the feed-forward sublayer of every layer;
* ``pfeiffer``: after the feed-forward sublayer only.

The adapters are attached with forward hooks to the modules that the backbone adapter
names (:meth:`spt.backbone.Backbone.sublayer_outputs`), so no model code is copied. The
up projection starts at zero: a fresh adapter is the identity, and the adapted model
starts as the frozen one. (The ``adapters`` library does not support transformers 5.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError

KINDS = {"houlsby": (0, 1), "pfeiffer": (1,)}  # which sublayer outputs (0: attention, 1: feed-forward) get one


class BottleneckAdapter(nn.Module):
    """``h + up(relu(down(h)))`` with a ``size``-wide bottleneck; ``up`` starts at zero."""

    def __init__(self, hidden_size: int, size: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.up = nn.Linear(size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.relu(self.down(hidden)))


def adapter_parameters(hidden_size: int, size: int) -> int:
    """Parameters of one adapter: ``2 d r + r + d``."""
    return 2 * hidden_size * size + size + hidden_size


def adapter_size_for(target_params: int, hidden_size: int, num_layers: int, kind: str) -> int:
    """The bottleneck width whose adapters (``kind``, every layer) hold about ``target_params``."""
    count = num_layers * len(KINDS[kind])
    return max(1, round((target_params / count - hidden_size) / (2 * hidden_size + 1)))


def _hook(adapter: BottleneckAdapter):
    def apply(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return adapter(output)

    return apply


def add_adapters(sites: Sequence[tuple[nn.Module, nn.Module]], hidden_size: int, size: int, kind: str) -> nn.ModuleList:
    """Attach a fresh adapter to each of the ``kind`` sublayer outputs of ``sites`` (per layer: the
    attention and the feed-forward output module); the adapters, in layer order, to be trained."""
    if kind not in KINDS:
        raise ConfigError("compare.adapter_kind", f"unknown adapter kind {kind!r}; choose one of {', '.join(KINDS)}")
    adapters = nn.ModuleList()
    for modules in sites:
        for which in KINDS[kind]:
            adapter = BottleneckAdapter(hidden_size, size)
            modules[which].register_forward_hook(_hook(adapter))
            adapters.append(adapter)
    return adapters
