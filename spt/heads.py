"""Heads: what turns the backbone's final states into label scores.

Each head exposes ``representation`` (the vector ``h`` that the consistency loss
compares) and ``forward(h) -> logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from .backbone import Backbone
from .config import HeadConfig
from .errors import ConfigError


def last_token(states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, d)``: each example's last real token, wherever padding stands. ``last_positions``
    comes from the host (``spt.inputs.collate``); else it is found on the device."""
    last = batch.get("last_positions")
    if last is None:
        mask = batch["attention_mask"]
        last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    return states[torch.arange(states.shape[0], device=states.device), last]


class ClassifierHead(nn.Module):
    """Dropout + linear layer on the first real token (``cls``), the mean of real tokens
    (``mean``) or the last real token (``last``)."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str = "cls", dropout: float = 0.1) -> None:
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def representation(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``states``: (B, T, d) final states of the real-token positions."""
        if self.pooling == "mean":
            weights = batch.get("mean_weights")  # made on the host by spt.inputs.collate: one matmul
            if weights is None:
                mask = batch["attention_mask"].to(states.dtype)
                weights = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
            return torch.bmm(weights.to(states.dtype).unsqueeze(1), states).squeeze(1)
        if self.pooling == "last":
            return last_token(states, batch)
        # The first position is the first real token: batches are always right-padded
        # (spt.inputs.collate), whatever the tokenizer's padding side.
        return states[:, 0]

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        # In its weights' dtype (fp32) whatever autocast says: one cast of the (B, d)
        # representation replaces casts of the weight, the bias and the logits in both passes.
        with torch.autocast(representation.device.type, enabled=False):
            return self.classifier(self.dropout(representation.to(self.classifier.weight.dtype)))


class VerbalizerHead(nn.Module):
    """The backbone's frozen LM head scored on one label word per class: at the mask token
    (``mlm``) or as the next token after the last real token (``clm``)."""

    def __init__(self, backbone: Backbone, label_word_ids: list[int], kind: str = "mlm") -> None:
        super().__init__()
        # A plain attribute, not a submodule: the backbone belongs to the prompt model.
        object.__setattr__(self, "_backbone", backbone)
        self.kind = kind
        self.register_buffer("label_word_ids", torch.tensor(label_word_ids, dtype=torch.long), persistent=False)

    def representation(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "clm":
            return last_token(states, batch)
        rows = torch.arange(states.shape[0], device=states.device)
        return states[rows, batch["mask_positions"]]

    def forward(self, representation: torch.Tensor) -> torch.Tensor:
        return self._backbone.lm_logits(representation)[:, self.label_word_ids]


def label_word_ids(tokenizer, label_words: dict[str, str], labels: list[str]) -> list[int]:
    """Token id of each label's word; every word must be a single token."""
    ids = []
    for label in labels:
        word = label_words[label]
        # Byte-level BPE vocabularies (RoBERTa) hold mid-sentence words with a leading space.
        pieces = tokenizer.encode(" " + word, add_special_tokens=False)
        if len(pieces) != 1:
            pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ConfigError(
                f"head.label_words.{label}",
                f"{word!r} is {len(pieces)} tokens for this tokenizer; choose a word that is one token",
            )
        ids.append(pieces[0])
    return ids


def head_parameter_count(head_type: str, hidden_size: int, num_labels: int) -> int:
    """Trainable parameters of a head: a classifier's linear layer; none for a frozen verbalizer."""
    return 0 if head_type in ("mlm", "clm") else hidden_size * num_labels + num_labels


def build_head(backbone: Backbone, config: HeadConfig, labels: list[str]) -> nn.Module:
    """The head described by ``config`` for ``labels`` on ``backbone``."""
    config.validate(labels)
    if config.verbalizer:
        if config.type != backbone.verbalizer_type:
            kind = "a decoder" if backbone.is_decoder else "an encoder"
            raise ConfigError("head.type", f"{config.type!r} does not fit {backbone.name!r}, {kind}; "
                              f"its LM head serves head.type: {backbone.verbalizer_type}")
        if backbone.lm_head is None:
            raise ConfigError("head.type", f"{config.type!r} needs the backbone loaded with its LM head ({backbone.name!r} was not)")
        return VerbalizerHead(backbone, label_word_ids(backbone.tokenizer, config.label_words, labels), config.type)
    return ClassifierHead(backbone.hidden_size, len(labels), config.pooling_for(backbone.is_decoder), config.dropout)
