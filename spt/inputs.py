"""A model's inputs: tokenize examples once, then cut them into right-padded tensor batches.

An example is anything with ``text_a``, ``text_b`` (or None) and an integer ``label``
(the task data's :class:`search.data.Example`, or :class:`TextInput` for new text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import HeadConfig
from .errors import UserError
from .generator import adaptive_pool_weights


@dataclass(frozen=True)
class TextInput:
    """New text to score: one segment, or a pair; ``label`` only where it is known."""

    text_a: str
    text_b: str | None = None
    label: int = 0


@dataclass
class EncodedSplit:
    """Token ids of a split (unpadded), labels, and for an MLM head the mask positions."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    mask_positions: list[int] | None
    pad_id: int

    def __len__(self) -> int:
        return len(self.labels)


def _apply_template(tokenizer, template: str, example: TextInput, max_length: int) -> tuple[list[int], int]:
    """Token ids of the filled template and the mask position; text is cut, never the mask."""
    text_a, text_b = example.text_a, example.text_b or ""
    for _ in range(3):
        text = template.format(text_a=text_a, text_b=text_b, mask=tokenizer.mask_token)
        ids = tokenizer(text, truncation=False)["input_ids"]
        overflow = len(ids) - max_length
        if overflow <= 0:
            return ids, ids.index(tokenizer.mask_token_id)
        # Cut the longer text by the overflow and try again.
        longer = "a" if len(text_a) >= len(text_b) else "b"
        tokens = tokenizer.tokenize(text_a if longer == "a" else text_b)
        cut = tokenizer.convert_tokens_to_string(tokens[: max(0, len(tokens) - overflow)])
        text_a, text_b = (cut, text_b) if longer == "a" else (text_a, cut)
    raise UserError("model.max_length", f"{max_length} tokens cannot hold the template {template!r}")


def encode_split(tokenizer, examples: Sequence[TextInput], max_length: int, head: HeadConfig) -> EncodedSplit:
    """Tokenize ``examples`` for ``head`` (plain segments, or the MLM template)."""
    labels = [ex.label for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if head.type == "mlm":
        encoded = [_apply_template(tokenizer, head.template, ex, max_length) for ex in examples]
        return EncodedSplit([ids for ids, _ in encoded], None, labels, [pos for _, pos in encoded], pad_id)
    texts_a = [ex.text_a for ex in examples]
    pairs = [ex.text_b or "" for ex in examples] if any(ex.text_b is not None for ex in examples) else None
    out = tokenizer(texts_a, pairs, truncation=True, max_length=max_length)
    token_types = out.get("token_type_ids")
    return EncodedSplit(list(out["input_ids"]), list(token_types) if token_types is not None else None, labels, None, pad_id)


def collate(
    split: EncodedSplit, indices: Sequence[int], device: torch.device | str = "cpu", prompt_length: int | None = None,
) -> dict[str, torch.Tensor | bool]:
    """A right-padded batch of the examples at ``indices``.

    Made on the host, so the model never has to read a tensor to learn it: ``has_padding``
    (a bool), the weights of mean pooling and, given ``prompt_length``, the generators'
    pooling weights.
    """
    rows = [split.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), split.pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention[j, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": torch.tensor([split.labels[i] for i in indices])}
    if split.token_type_ids is not None:
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            t = split.token_type_ids[i]
            types[j, : len(t)] = torch.tensor(t, dtype=torch.long)
        batch["token_type_ids"] = types
    if split.mask_positions is not None:
        batch["mask_positions"] = torch.tensor([split.mask_positions[i] for i in indices], dtype=torch.long)
    if prompt_length is not None:
        batch["pool_weights"] = adaptive_pool_weights(attention, prompt_length)
    batch["mean_weights"] = attention / attention.sum(1, keepdim=True).clamp(min=1)  # mean pooling as one matmul
    moved: dict[str, torch.Tensor | bool] = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    moved["has_padding"] = any(len(r) < width for r in rows)
    return moved
