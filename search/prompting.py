"""Discrete and in-context prompting: the frozen language model scores each label word after a
template, and nothing is trained.

* ``zero-shot``: ``task.instruction`` (if any), then the template filled with the input;
* ``in-context``: the instruction, then ``compare.demonstrations`` training examples drawn
  with the seed, each the template filled with the example and its label word, one per
  line, then the input's template (demonstrations that do not fit ``model.max_length``
  are left out, the earliest first).

The verbalizer is the backbone's own LM head: a masked LM's at the ``{mask}`` token for an
encoder (``mlm``), a causal LM's next-token scores after the last token for a decoder
(``clm``). The template and label words are ``head.template`` and ``head.label_words``,
whatever ``head.type`` the config trains with. A backbone without a trained LM head is
refused with that reason.
"""

from __future__ import annotations

import dataclasses
import random

from spt.backbone import Backbone
from spt.config import HeadConfig
from spt.errors import MissingHeadError, UserError
from spt.heads import build_head
from spt.inputs import answered, encode_split

from .baselines import FrozenModel
from .pipeline import Prepared, run_backbone


def lm_backbone(prep: Prepared, strategy: str) -> Backbone:
    """``prep``'s backbone with its trained LM head (loaded once more if ``prep``'s has none)."""
    if prep.backbone.lm_head is not None:
        return prep.backbone
    name = prep.config.model.backbone
    try:
        return run_backbone(prep.config, True)
    except MissingHeadError as exc:
        raise UserError(f"strategy {strategy}", f"scores label words with the backbone's language-model head, and "
                        f"{name!r} has no trained one ({exc.detail}); leave {strategy} out for this backbone") from None


def verbalizer_config(prep: Prepared, backbone: Backbone, strategy: str) -> HeadConfig:
    """The verbalizer head of ``backbone``'s kind built from the config's template and label words."""
    head = prep.config.head
    if not head.template or not head.label_words:
        raise UserError(f"strategy {strategy}", "needs head.template and head.label_words to score label words, e.g. "
                        "--set 'head.template={text_a} It was {mask}.' --set \"head.label_words={'0': bad, '1': good}\"")
    config = dataclasses.replace(head, type=backbone.verbalizer_type)
    config.validate(prep.data.labels)
    return config


def demonstrations(prep: Prepared, head: HeadConfig, count: int) -> list[str]:
    """``count`` training examples drawn with the seed, each answered with its label word."""
    train = prep.data.train
    chosen = random.Random(prep.config.seed).sample(range(len(train)), min(count, len(train)))
    words = [head.label_words[label] for label in prep.data.labels]
    return [answered(head.template, train[i], words[train[i].label]) for i in chosen]


def prompted(prep: Prepared, strategy: str, count: int = 0) -> tuple[Prepared, FrozenModel]:
    """``prep`` re-encoded for prompting (``count`` demonstrations), and the frozen model that scores it."""
    backbone = lm_backbone(prep, strategy)
    head = verbalizer_config(prep, backbone, strategy)
    config = dataclasses.replace(prep.config, head=head)
    shown = demonstrations(prep, head, count) if count else []
    tok, max_len, instruction = backbone.tokenizer, config.model.max_length, config.task.instruction
    dev, test = (encode_split(tok, examples, max_len, head, instruction, shown) for examples in (prep.data.dev, prep.data.test))
    scored = dataclasses.replace(prep, config=config, backbone=backbone, dev=dev, test=test)
    return scored, FrozenModel(backbone, build_head(backbone, head, prep.data.labels))


def demonstrations_note(prepared: Prepared, count: int) -> str:
    """How many demonstrations the inputs' contexts held (they fit ``model.max_length`` or not)."""
    if not count:
        return "no training"
    used = (prepared.dev.demonstrations or []) + (prepared.test.demonstrations or [])
    return f"{sum(used) / max(1, len(used)):.1f} of {count} demonstrations per input"
