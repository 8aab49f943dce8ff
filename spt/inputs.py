"""A model's inputs: tokenize examples once (plain segments, or verbalizer templates after an
instruction and in-context demonstrations), then cut them into right-padded tensor batches.

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
    """Token ids of a split (unpadded), labels, for an ``mlm`` verbalizer the mask positions,
    and (in-context prompting) how many demonstrations each example's context holds."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int]
    mask_positions: list[int] | None
    pad_id: int
    demonstrations: list[int] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def lines(*parts: str | None) -> str:
    """The non-empty ``parts`` as lines (joined by newlines), or ``""``."""
    return "\n".join(p for p in parts if p)


def answered(template: str, example: TextInput, word: str) -> str:
    """A demonstration: ``template`` filled with ``example`` and its label ``word`` at ``{mask}``."""
    return template.format(text_a=example.text_a, text_b=example.text_b or "", mask=word)


def _template_ids(tokenizer, text: str, kind: str) -> list[int]:
    ids = tokenizer(text, truncation=False)["input_ids"]
    if kind == "clm":  # the label word follows the template's last token, not an appended end token
        special = set(tokenizer.all_special_ids)
        while len(ids) > 1 and ids[-1] in special:
            ids = ids[:-1]
    return ids


def _apply_template(tokenizer, template: str, example: TextInput, max_length: int, kind: str = "mlm",
                    context: str = "", cut: bool = True) -> tuple[list[int], int] | None:
    """Token ids of ``context`` and the filled template, and where the label word is scored
    (``mlm``: the mask token; ``clm``: the last token, the template read up to ``{mask}``).

    Only the example's text is cut to fit, never the context or the template; with
    ``cut=False`` a sequence that does not fit is ``None`` instead.
    """
    if kind == "clm":
        template = template.split("{mask}")[0].rstrip()
    prefix = context + "\n" if context else ""
    text_a, text_b = example.text_a, example.text_b or ""
    for _ in range(3):
        text = prefix + template.format(text_a=text_a, text_b=text_b, mask=tokenizer.mask_token)
        ids = _template_ids(tokenizer, text, kind)
        overflow = len(ids) - max_length
        if overflow <= 0:
            return ids, (ids.index(tokenizer.mask_token_id) if kind == "mlm" else len(ids) - 1)
        if not cut:
            return None
        # Cut the longer text by the overflow and try again.
        longer = "a" if len(text_a) >= len(text_b) else "b"
        tokens = tokenizer.tokenize(text_a if longer == "a" else text_b)
        cut_text = tokenizer.convert_tokens_to_string(tokens[: max(0, len(tokens) - overflow)])
        text_a, text_b = (cut_text, text_b) if longer == "a" else (text_a, cut_text)
    raise UserError("model.max_length", f"{max_length} tokens cannot hold the template {template!r}"
                    + (" after task.instruction" if context else ""))


def _in_context(tokenizer, head: HeadConfig, example: TextInput, max_length: int, instruction: str | None,
                demonstrations: Sequence[str]) -> tuple[list[int], int, int]:
    """The template of ``example`` after the instruction and as many of the demonstrations (the
    last ones) as fit uncut; with none left, the example's text is cut as usual."""
    for n in range(len(demonstrations), -1, -1):
        context = lines(instruction, *demonstrations[len(demonstrations) - n:])
        out = _apply_template(tokenizer, head.template, example, max_length, head.type, context, cut=n == 0)
        if out is not None:
            return out[0], out[1], n
    raise AssertionError("unreachable: the last try cuts the text")


def encode_split(tokenizer, examples: Sequence[TextInput], max_length: int, head: HeadConfig,
                 instruction: str | None = None, demonstrations: Sequence[str] = ()) -> EncodedSplit:
    """Tokenize ``examples`` for ``head``: plain segments, or a verbalizer's template.

    ``instruction`` (``task.instruction``) is a line before each input: it opens text_a
    (segment A) for a classifier, and precedes the template (and any ``demonstrations``,
    answered examples for in-context prompting, one per line) for a verbalizer. Truncation
    cuts the input, never the instruction.
    """
    labels = [ex.label for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if head.verbalizer:
        encoded = [_in_context(tokenizer, head, ex, max_length, instruction, demonstrations) for ex in examples]
        positions = [pos for _, pos, _ in encoded] if head.type == "mlm" else None
        used = [n for _, _, n in encoded] if demonstrations else None
        return EncodedSplit([ids for ids, _, _ in encoded], None, labels, positions, pad_id, used)
    texts_a = [lines(instruction, ex.text_a) if instruction else ex.text_a for ex in examples]
    pairs = [ex.text_b or "" for ex in examples] if any(ex.text_b is not None for ex in examples) else None
    out = tokenizer(texts_a, pairs, truncation=True, max_length=max_length)
    token_types = out.get("token_type_ids")
    return EncodedSplit(list(out["input_ids"]), list(token_types) if token_types is not None else None, labels, None, pad_id)


def longest_first(split: EncodedSplit, indices: Sequence[int]) -> list[int]:
    """``indices`` ordered longest example first (ties in their order): batches cut from it hold
    examples of similar lengths, so evaluation pays for less padding (SST-2's dev set in batches
    of 64: 24k padded positions instead of 46k), and the largest batch comes first, where a
    memory limit shows at once."""
    return sorted(indices, key=lambda i: -len(split.input_ids[i]))


def collate(
    split: EncodedSplit, indices: Sequence[int], device: torch.device | str = "cpu", prompt_length: int | None = None,
    weights_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor | bool]:
    """A right-padded batch of the examples at ``indices``.

    Made on the host, so the model never has to read a tensor to learn it: ``has_padding``
    (a bool), the weights of mean pooling, the last real token of each example and, given
    ``prompt_length``, the generators' pooling weights. Right padding serves decoders too:
    under causal attention no real token sees the padding after it. ``weights_dtype``: the
    pooling weights' dtype (bf16 under bf16 autocast: cast here, not on the device each step).
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
    batch["last_positions"] = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)  # last-token pooling
    if weights_dtype is not None:
        for key in ("pool_weights", "mean_weights"):
            if key in batch:
                batch[key] = batch[key].to(weights_dtype)
    moved: dict[str, torch.Tensor | bool] = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    moved["has_padding"] = any(len(r) < width for r in rows)
    return moved
